"""Fault injection on the real CLI: SIGKILL during generation, mid-step and during a checkpoint write
(that one at a fixed point: the GIFT_FAULT hook of gift_megatron/faults.py), then resume; the finished
run must equal an uninterrupted one (metrics of every step, and the final checkpoint's model and
optimizer tensors bit for bit). Also: secrets in the environment never reach the run folder or the
output; NaN/Inf bookkeeping."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gift_megatron.faults import FAULT_ENV
from gift_megatron.guard import TOKEN_ENV, tagged
from tests.conftest import CANARY, STRAIGHT
from tests.procs import explain

ROOT = Path(__file__).resolve().parents[1]
RUN = STRAIGHT
KEYS = ("reward", "loss", "grad_norm", "response_length")


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *RUN, *extra]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _start(run_dir: Path, env: dict | None = None, extra: tuple = ()) -> subprocess.Popen:
    return subprocess.Popen(_cmd(run_dir, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)


def _end(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its group (a failing test leaks nothing)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    proc.stderr.close()


def _kill_when(run_dir: Path, ready, timeout_s: float = 600.0, only_trainer: bool = False, extra: tuple = ()) -> None:
    """Start the run, poll `ready(run_dir)` every millisecond, SIGKILL the run's process group then, or
    with `only_trainer` the trainer's PID alone: everything it started must then end too (no orphans).
    For faults whose window is a whole phase (generation, a step); a short window gets a hook (_fault_at)."""
    proc = _start(run_dir, extra=extra)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready(run_dir):
            assert proc.poll() is None, f"the run ended before the fault: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the fault's trigger never came"
            time.sleep(0.001)
        if not only_trainer:
            os.killpg(proc.pid, signal.SIGKILL)
            return
        token = dict(e.split("=", 1) for e in Path(f"/proc/{proc.pid}/environ").read_text().split("\0") if "=" in e)
        token = token[TOKEN_ENV]
        children = [p for p in tagged(token) if p != proc.pid]
        names = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode() for p in children]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        end = time.monotonic() + 30
        while (left := tagged(token)) and time.monotonic() < end:
            time.sleep(0.2)
        assert len(children) >= 2, names  # megatron's checkpoint-writer Manager and its resource tracker, ...
        assert not left, f"orphans of the killed trainer: {left}"
    finally:
        _end(proc)


def _fault_at(run_dir: Path, fault: str, timeout_s: float = 600.0) -> None:
    """Run with GIFT_FAULT=`fault`: the trainer SIGKILLs itself at that point (gift_megatron/faults.py)."""
    proc = _start(run_dir, env=dict(os.environ, **{FAULT_ENV: fault}))
    try:
        code = proc.wait(timeout=timeout_s)
        assert code == -signal.SIGKILL, f"exit {code}, not the fault's SIGKILL: {proc.stderr.read()[-3000:]}"
    finally:
        _end(proc)


def _logged(step: int):
    def ready(run_dir: Path) -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and f'"step": {step},' in path.read_text()
    return ready


def _checkpoint_tensors(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/all.pt")
        state = torch.load(f"{tmp}/all.pt", weights_only=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, straight_run):
    straight, output = straight_run  # conftest: the same RUN, uninterrupted, with canary secrets in its environment
    assert CANARY not in output
    leaks = [f for f in straight.rglob("*") if f.is_file() and CANARY.encode() in f.read_bytes()]
    assert not leaks, leaks

    crashed = tmp_path / "crashed"
    # 1. step 1 logged, no checkpoint yet: the kill lands in step 2's generation -> a fresh restart
    _kill_when(crashed, _logged(1))
    # 2. during the write of checkpoint 2 (the hook: every shard written, no manifest, not renamed into place):
    # the half-written folder must never be loaded
    _fault_at(crashed, "kill_during_checkpoint_write:2")
    ckpts, tmp = crashed / "checkpoints", crashed / "checkpoints" / ".tmp_step_00000002"
    assert not (ckpts / "step_00000002").exists() and list(tmp.glob("*.distcp"))
    assert not (tmp / "manifest.json").exists()
    # 3. checkpoint 2 published and step 3 logged: the trainer's PID alone killed inside step 4 (its vLLM engine
    # core, checkpoint writer and resource tracker must end with it) -> resume from step 2
    _kill_when(crashed, lambda d: (d / "checkpoints" / "step_00000002").is_dir() and _logged(3)(d),
               only_trainer=True)
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

    # the newest checkpoint damaged (4 KiB of random bytes inside a shard, size unchanged): named, and the
    # run resumes from the newest intact one (step 2) and ends as the uninterrupted run did
    shard = max((ckpts / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(os.urandom(4096))
    proc = subprocess.run(_cmd(crashed), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, explain(proc)
    out = proc.stdout + proc.stderr
    assert f"{shard}: content differs from its digest" in out and "step_00000002 (step 2)" in out, explain(proc)
    assert [r["step"] for r in _rows(crashed)] == [0, 1, 2, 3, 4]
    assert {k: _rows(crashed)[-1][k] for k in KEYS} == {k: want[-1][k] for k in KEYS}

    # the same folder resumed with another model: named before anything is written or trained (no new
    # warm-up for the other model, config.yaml / model.yaml kept for the checkpoints they describe)
    kept = {f: (crashed / f).read_bytes() for f in ("config.yaml", "model.yaml")}
    warmups = sorted(Path(os.environ["GIFT_WARMUP_CACHE"]).iterdir())
    proc = subprocess.run([*_cmd(crashed), "model.num_layers=3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode != 0
    assert "step_00000004 was written for another model (num_layers: checkpoint 2, run 3)" in proc.stderr, \
        explain(proc)
    assert {f: (crashed / f).read_bytes() for f in kept} == kept
    assert sorted(Path(os.environ["GIFT_WARMUP_CACHE"]).iterdir()) == warmups


def test_rollouts_ahead_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, straight_ahead_run):
    """rollout.max_staleness=1 (batch n generated with version n - 2 on a background thread): checkpoint 2
    holds batch 3, generated ahead with version 1, and maybe batch 4 (version 2); the trainer's PID alone
    killed inside step 4 (mid-round or mid-step) -> the resume takes them back instead of generating them
    from the checkpoint's weights (version 2), and the run ends as the uninterrupted one did, bit for bit."""
    ahead = ("rollout.max_staleness=1",)
    straight, crashed = straight_ahead_run, tmp_path / "crashed"
    _kill_when(crashed, lambda d: (d / "checkpoints" / "step_00000002").is_dir() and _logged(3)(d),
               only_trainer=True, extra=ahead)
    from gift_megatron.rollout.ahead import load_pending
    from gift_megatron.trainer import PENDING_FILE

    pending, _ = load_pending(crashed / "checkpoints" / "step_00000002" / PENDING_FILE)
    assert [(r.metrics["rollout_step"], r.version) for r in pending][:1] == [(3, 1)], pending
    proc = subprocess.run(_cmd(crashed, *ahead), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, explain(proc)
    assert "step_00000002 (step 2)" in proc.stdout + proc.stderr
    want, got = _rows(straight), _rows(crashed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]
    assert [r.get("staleness") for r in want] == [None, 0.0, 1.0, 1.0, 1.0]
    for w, g in zip(want[1:], got[1:]):
        assert {k: g[k] for k in (*KEYS, "staleness")} == {k: w[k] for k in (*KEYS, "staleness")}
        assert g["logprob_diff_max"] < 1e-4  # verified against the weights that generated (version n - 2)
    assert got[-1]["eval_accuracy"] == want[-1]["eval_accuracy"]
    a = _checkpoint_tensors(straight / "checkpoints" / "step_00000004")
    b = _checkpoint_tensors(crashed / "checkpoints" / "step_00000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_fault_hook_fires_at_its_point_and_step_only():
    """GIFT_FAULT=<point>:<step> SIGKILLs the process at that call and no other (not another step, not
    another point); unset, no call does anything."""
    calls = [("kill_during_checkpoint_write", 1), ("kill_during_checkpoint_write", 12), ("another_point", 2),
             ("kill_during_checkpoint_write", 2), ("kill_during_checkpoint_write", 3)]
    script = ("from gift_megatron.faults import maybe_fail\n"
              f"for point, step in {calls!r}:\n"
              "    print(point, step, flush=True)\n"
              "    maybe_fail(point, step)\n")

    def run(**env: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | env
        return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                              timeout=60)

    printed = [f"{p} {s}" for p, s in calls]
    armed = run(**{FAULT_ENV: "kill_during_checkpoint_write:2"})
    assert armed.returncode == -signal.SIGKILL and armed.stdout.splitlines() == printed[:4], armed
    other = run(**{FAULT_ENV: "another_point:1"})  # a point with no call at that step
    assert other.returncode == 0 and other.stdout.splitlines() == printed, other
    unset = run()
    assert unset.returncode == 0 and unset.stdout.splitlines() == printed, unset


def test_nonfinite_steps_are_counted_and_stop_the_run_after_n_in_a_row(tmp_path):
    """The skip itself is tested on gloo (test_megatron: a NaN on one rank skips every rank's update);
    here the run's bookkeeping: counted, logged, reset by a finite step, an error after N in a row."""
    import pytest

    from gift_megatron.trainer import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard(max_in_a_row=3, checkpoints=tmp_path / "checkpoints")
    for step, flag in enumerate([1.0, 1.0, 0.0, 1.0, 0.5], start=1):  # 0.5: one of two mini-batches
        metrics = {"nonfinite": flag}
        guard.count(metrics)
        guard.check(step)
    assert metrics["nonfinite_total"] == 4 and guard.in_a_row == 2
    guard.count({"nonfinite": 1.0})
    with pytest.raises(NonFiniteError, match="3 steps in a row .to step 6. had a NaN/Inf .* lower optim.lr"):
        guard.check(6)


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
