"""Fault injection on the real CLI: SIGKILL during generation, mid-step and during a checkpoint write,
then resume; the finished run must equal an uninterrupted one (metrics of every step, and the final
checkpoint's model and optimizer tensors bit for bit). Also: secrets in the environment never reach
the run folder or the output; NaN/Inf bookkeeping."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]
RUN = ["num_steps=4", "eval_every=100", "save_every=2"]
KEYS = ("reward", "loss", "grad_norm", "response_length")


def _cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *RUN]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _kill_when(run_dir: Path, ready, timeout_s: float = 600.0) -> None:
    """Start the run, poll `ready(run_dir)` every millisecond, SIGKILL the run's process group then."""
    proc = subprocess.Popen(_cmd(run_dir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready(run_dir):
            assert proc.poll() is None, f"the run ended before the fault: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the fault's trigger never came"
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()


def _logged(step: int):
    def ready(run_dir: Path) -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and f'"step": {step},' in path.read_text()
    return ready


def _writing_checkpoint(step: int):
    def ready(run_dir: Path) -> bool:  # the temporary folder has its first shard: the write is under way
        tmp = run_dir / "checkpoints" / f".tmp_step_{step:08d}"
        return tmp.is_dir() and any(tmp.iterdir())
    return ready


def _checkpoint_tensors(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/all.pt")
        state = torch.load(f"{tmp}/all.pt", weights_only=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    canary = "gift-canary-7f3a9c"  # secrets come from the environment and must never be written anywhere
    env = dict(os.environ, WANDB_API_KEY=canary, HF_TOKEN=canary)
    proc = subprocess.run(_cmd(straight), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, explain(proc)
    assert canary not in proc.stdout + proc.stderr
    leaks = [f for f in straight.rglob("*") if f.is_file() and canary.encode() in f.read_bytes()]
    assert not leaks, leaks

    crashed = tmp_path / "crashed"
    # 1. step 1 logged, no checkpoint yet: the kill lands in step 2's generation -> a fresh restart
    _kill_when(crashed, _logged(1))
    # 2. during the write of checkpoint 2: the half-written folder must never be loaded
    _kill_when(crashed, _writing_checkpoint(2))
    ckpts = crashed / "checkpoints"
    assert not (ckpts / "step_00000002").exists() and (ckpts / ".tmp_step_00000002").exists()
    # 3. checkpoint 2 published and step 3 logged: killed inside step 4 -> resume from step 2
    _kill_when(crashed, lambda d: (d / "checkpoints" / "step_00000002").is_dir() and _logged(3)(d))
    proc = subprocess.run(_cmd(crashed), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, explain(proc)
    assert "step_00000002 (step 2)" in proc.stdout + proc.stderr  # "resumed from ..."

    want, got = _rows(straight), _rows(crashed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]  # each step logged once
    for w, g in zip(want[1:], got[1:]):
        assert {k: g[k] for k in KEYS} == {k: w[k] for k in KEYS}
    assert got[-1]["eval_accuracy"] == want[-1]["eval_accuracy"]
    a, b = _checkpoint_tensors(straight / "checkpoints" / "step_00000004"), _checkpoint_tensors(ckpts / "step_00000004")
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not list(ckpts.glob(".tmp_*"))  # the crashed write's leftovers were cleaned by a later save

    # the same folder resumed with another model: named, before any tensor is loaded
    proc = subprocess.run([*_cmd(crashed), "model.num_layers=3", "data.warmup_max_steps=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "step_00000004 was written for another model (num_layers: checkpoint 2, run 3)" in proc.stderr, \
        explain(proc)


def test_nonfinite_steps_are_counted_and_stop_the_run_after_n_in_a_row(tmp_path):
    """The skip itself is tested on gloo (test_megatron: a NaN on one rank skips every rank's update);
    here the run's bookkeeping: counted, logged, reset by a finite step, an error after N in a row."""
    from types import SimpleNamespace

    import pytest

    from gift_megatron.config import OptimConfig
    from gift_megatron.trainer import NonFiniteError, _check_nonfinite, _count_nonfinite

    c = SimpleNamespace(cfg=SimpleNamespace(optim=OptimConfig(max_nonfinite_steps=3)), run_dir=tmp_path, step=0,
                        nonfinite_in_a_row=0, nonfinite_total=0)
    for flag in [1.0, 1.0, 0.0, 1.0, 0.5]:  # 0.5: one of two mini-batches
        c.step += 1
        metrics = {"nonfinite": flag}
        _count_nonfinite(c, metrics)
        _check_nonfinite(c)
    assert metrics["nonfinite_total"] == 4 and c.nonfinite_in_a_row == 2
    c.step += 1
    _count_nonfinite(c, {"nonfinite": 1.0})
    with pytest.raises(NonFiniteError, match="3 steps in a row .to step 6. had a NaN/Inf .* lower optim.lr"):
        _check_nonfinite(c)


def test_servers_skip_a_port_someone_else_holds():
    """A busy port would answer /health for another process: the trainer's servers take free ones."""
    import socket

    from gift_megatron.launch import free_port

    start = free_port(9400)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", start))
        busy.listen()
        first = free_port(start)
        second = free_port(start, exclude=(first,))
    assert start < first < second
