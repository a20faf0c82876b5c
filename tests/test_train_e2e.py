"""gift-train end to end on CPU (real megatron-core policy, real vLLM, the embedded addition task).

Runs the real CLI (Hydra) in a subprocess. The supervised warm-up is cached under the runs' parent
folder, so it is trained once for the whole module. Seeds are fixed: the numbers are reproducible
on this machine kind; the margins are set below what was measured (README).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]


def train(run_dir: Path, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, explain(proc)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_gift_raises_reward_and_held_out_accuracy(runs):
    """The product's claim, gated well above noise: over 150 GIFT steps the mean training reward of the
    last 40 steps (40 x 256 samples) beats the first 40 steps' by >= 0.02, and held-out accuracy (500
    prompts) ends >= 0.015 above where it started. Measured on this machine kind (2026-11-30): reward
    0.091 -> 0.133, held-out 0.152 -> 0.184 (its warm-up stopped at 0.152; an earlier machine's at
    0.172, so the gate is relative, not absolute)."""
    rows = train(runs / "gift", "algo=gift", "num_steps=150", "eval_every=50", "save_every=1000")
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    steps = [r for r in rows if "reward" in r]
    assert len(evals) == 4 and len(steps) == 150  # step 0 and every 50 steps
    rewards = [r["reward"] for r in steps]
    assert _mean(rewards[-40:]) >= _mean(rewards[:40]) + 0.02, (_mean(rewards[:40]), _mean(rewards[-40:]))
    assert evals[-1] >= evals[0] + 0.015, evals
    assert max(r["logprob_diff_max"] for r in steps) < 1e-3  # vLLM and the trainer agree after every sync
    assert all(r["update_skipped"] == 0 for r in steps)
    assert (runs / "gift" / "checkpoints" / "step_00000150").exists() and (runs / "gift" / "tb").exists()


def test_grpo_runs_the_same_loop(runs):
    """GRPO through the same loop (its learning is compared over seeds in bench/convergence.py: 60 steps
    on one seed are within noise of the start, measured 0.152 -> 0.118 / 0.168)."""
    rows = train(runs / "grpo", "algo=grpo", "num_steps=20", "eval_every=20", "save_every=1000")
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == 20 and all(r["update_skipped"] == 0 and "clip_frac" in r for r in steps)
    assert max(r["logprob_diff_max"] for r in steps) < 1e-3
    assert all(r["grad_norm"] > 0 for r in steps if 0 < r["reward"] < 1)


def test_interrupted_run_resumes_exactly(runs, straight_run):
    """A run of 2 steps extended to 4 resumes from its step-2 checkpoint and trains exactly as the
    uninterrupted run. Both parts check vLLM against the trainer only every 2nd step (GIFT does not use
    the rollout policy's log-probs, so that pass is skipped on the others and training is unchanged)."""
    straight = [json.loads(line) for line in (straight_run[0] / "metrics.jsonl").read_text().splitlines()]
    sparse = ["eval_every=100", "save_every=2", "rollout.verify_every=2"]
    train(runs / "resumed", "num_steps=2", *sparse)
    resumed = train(runs / "resumed", "num_steps=4", *sparse)  # picks up step 2
    keys = ("reward", "loss", "grad_norm", "response_length")
    steps = {r["step"]: r for r in resumed if "reward" in r}
    assert sorted(steps) == [1, 2, 3, 4]  # each step logged once
    assert [s for s in steps if "logprob_diff_max" in steps[s]] == [1, 3]  # c.step 0 and 2 before the step
    assert [{k: steps[s][k] for k in keys} for s in (1, 2, 3, 4)] == [
        {k: r[k] for k in keys} for r in straight if "reward" in r]


def test_console_script_composes_the_default_config():
    """`gift-train` (README's main command) finds conf/ and composes the embedded default."""
    script = Path(sys.executable).parent / "gift-train"
    proc = subprocess.run([str(script), "--cfg", "job", "algo=dapo"], cwd="/", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, explain(proc)
    assert "name: dapo" in proc.stdout and "name: tiny-llama" in proc.stdout


def test_dapo_dynamic_sampling_and_gspo_run_in_the_same_loop(runs):
    dapo = [r for r in train(runs / "dapo", "algo=dapo", "num_steps=3", "eval_every=100") if "reward" in r]
    assert len(dapo) == 3
    # ~30% of groups are all-wrong at this accuracy: DAPO regenerates until the batch is informative
    assert all(r["sampling_rounds"] >= 1 for r in dapo)
    assert sum(r["frac_groups_informative"] for r in dapo) / 3 > 0.9
    assert max(r["sampling_rounds"] for r in dapo) > 1
    gspo = [r for r in train(runs / "gspo", "algo=gspo", "num_steps=2", "eval_every=100") if "reward" in r]
    assert len(gspo) == 2 and all("clip_frac" in r for r in gspo)


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(runs):
    import signal
    import time

    run_dir = runs / "preempted"
    proc = subprocess.Popen([sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", "num_steps=100000",
                             "eval_every=100000", "save_every=100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75  # EX_TEMPFAIL: checkpointed after a stop signal, rerun to resume
    last = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert saved and int(saved[-1].name.split("_")[1]) >= last >= 3


def test_a_logprob_mismatch_stops_the_run(runs):
    """The alarm is a stop, not a log line: with a threshold below fp32 noise every checked step trips
    it; the first warns, the second (mismatch_patience=2) stops the run before its update, naming the
    likely causes. (The correct-sync runs above stay under the default 1e-3 by four orders.)"""
    run_dir = runs / "alarm"
    cmd = [sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", "num_steps=5", "eval_every=100",
           "save_every=100", "rollout.max_logprob_mismatch=1e-12", "rollout.mismatch_patience=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr  # Hydra logs to stdout, the traceback goes to stderr
    assert proc.returncode != 0
    assert "1 of 2 checked steps in a row before the run stops" in output, explain(proc)
    assert "MismatchError: step 1: the engine's log-probs differ from the trainer's" in output, explain(proc)
    assert "a tied LM head, a fused qkv/gate_up split across buckets" in output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1]  # step 0's eval, the warned step 1; the run stopped inside step 2, before its update
    # log_level=WARNING (default): no third-party INFO, no per-sync reload notes, no vLLM-CPU noise
    import re

    assert not re.search(r"\]\[(megatron|vllm|transformers)[^\]]*\]\[INFO\]", output), output[-3000:]
    for noise in ("Failed to load weights", "Chat template warmup failed", "Using None for EOS token id"):
        assert noise not in output, noise
