"""What an operator does to a run folder, on the real CLI: Ctrl-C once or twice inside a step, a second
launch on the same folder, resume=false on a used folder, a resume that changes the algorithm. Each
must leave the run exact or refuse before touching it (docs/reliability.md, "Run state")."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gift_megatron.faults import FAULT_ENV
from gift_megatron.manifest import verify_folder
from gift_megatron.run_dir import LOCK_NAME, RunDirBusy, RunLock, changed_meaning, meaning, refused_changes
from tests.conftest import STRAIGHT
from tests.procs import explain
from tests.test_faults import KEYS, _checkpoint_tensors, _rows

ROOT = Path(__file__).resolve().parents[1]
VERIFY = [sys.executable, str(ROOT / "tools" / "verify_checkpoint.py")]


def _run(run_dir: Path, *extra: str, fault: str | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | ({FAULT_ENV: fault} if fault else {})
    return subprocess.run([sys.executable, "-m", "gift_megatron.train", f"run_dir={run_dir}", *STRAIGHT, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME and "hydra" not in p.parts}


def _assert_equals_straight(run_dir: Path, straight: Path) -> None:
    want, got = _rows(straight), _rows(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]  # each step logged once
    for w, g in zip(want[1:], got[1:]):
        assert {k: g[k] for k in KEYS} == {k: w[k] for k in KEYS}
    a = _checkpoint_tensors(straight / "checkpoints" / "step_00000004")
    b = _checkpoint_tensors(run_dir / "checkpoints" / "step_00000004")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]


def test_ctrl_c_stops_at_a_step_boundary_and_twice_aborts_without_saving(tmp_path, straight_run):
    """One Ctrl-C inside step 3 (after its update, before the sync): step 3 ends, its checkpoint holds the
    state after step 3 and nothing of step 4, exit 130; the rerun equals the uninterrupted run. Two Ctrl-Cs
    (the second as the checkpoint starts): exit at once, nothing saved, the last checkpoint intact.
    (Before: a Ctrl-C saved from inside the step, labelled step 3 and holding the sampler past step 4.)"""
    straight, run = straight_run[0], tmp_path / "run"
    twice = _run(run, fault="step_train:3:INT,checkpoint_data:3:INT")
    assert twice.returncode == 130, explain(twice)
    assert "second interrupt: aborting without saving" in twice.stderr
    assert set(_steps(run)) - {".tmp_step_00000003"} == {"step_00000002"}, _steps(run)  # 3 never published
    assert verify_folder(run / "checkpoints" / "step_00000002") == []

    once = _run(run, fault="step_train:3:INT")  # resumes from step 2; the interrupt lands inside step 3
    assert once.returncode == 130, explain(once)
    assert "stop signal at step 3: checkpoint saved" in once.stdout + once.stderr, explain(once)
    assert _steps(run) == ["step_00000002", "step_00000003"]
    state = json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert state["step"] == 3 and state["optimizer_steps"] == 3 and state["sampler"]["position"] == 3 * 32
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3]

    done = _run(run)
    assert done.returncode == 0, explain(done)
    assert "step_00000003 (step 3)" in done.stdout + done.stderr  # "resumed from ..."
    _assert_equals_straight(run, straight)


def test_a_second_launch_on_the_same_folder_is_refused_naming_the_holder(tmp_path, straight_run):
    """One run folder, one run: a second gift-train (and a --sign of its checkpoints) is refused within
    seconds, before it touches anything, naming the holder; the first run ends exactly as if alone.
    (Before: both trained; one crashed on the other's temporary files, metrics held steps 0,0,1,1,...)"""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gift_megatron.train", f"run_dir={run}", *STRAIGHT], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step_00000002").is_dir():  # the first run is mid-way
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)  # held mid-run (still holding the lock) while the others try:
        try:  # on a busy machine the first run could otherwise finish, and release it, before they start
            start = time.monotonic()
            second = _run(run, timeout=120)
            took = time.monotonic() - start
            signed = subprocess.run([*VERIFY, "--sign", str(run / "checkpoints" / "step_00000002")],
                                    capture_output=True, text=True, timeout=60)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
        first.stderr.close()
    assert second.returncode != 0 and took < 30, (took, explain(second))
    assert f"{run} is in use by another process" in second.stderr and f'"pid": {first.pid}' in second.stderr
    assert signed.returncode == 1 and "not signed" in signed.stdout and f'"pid": {first.pid}' in signed.stdout
    _assert_equals_straight(run, straight_run[0])


def test_resume_false_on_a_used_folder_refuses_or_moves_the_old_run_aside(tmp_path, straight_run):
    """resume=false never wipes or mixes: refused (nothing changed), or with move_old_run=true the old run
    moves to RUN.old-DATE-TIME intact and the new one starts empty. (Before: metrics.jsonl wiped, the new
    run's checkpoints pruned by the old ones', and the next resume loaded the OLD run's weights.)"""
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)
    before = _files(run)
    refused = _run(run, "resume=false", timeout=120)
    assert refused.returncode != 0 and "resume=false, but" in refused.stderr and "move_old_run=true" in refused.stderr
    assert _files(run) == before

    moved = _run(run, "resume=false", "move_old_run=true", "num_steps=2")
    assert moved.returncode == 0, explain(moved)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the old run in {run} to {aside[0]}" in moved.stdout + moved.stderr
    kept = _files(aside[0])
    assert {k: v for k, v in kept.items() if k in before} == before and set(before) <= set(kept)
    assert [r["step"] for r in _rows(run)] == [0, 1, 2] and _steps(run) == ["step_00000002"]


def test_a_resume_that_changes_the_algorithm_is_refused_unless_allowed(tmp_path, straight_run):
    """algo=grpo on a GIFT folder: refused naming the fields (nothing written); allowed with
    resume_allow_changes=[algo], it trains on and the run history records the change. (Before: resumed
    silently with GIFT's Adam state, config.yaml rewritten, nothing recording that steps 1-4 were GIFT.)"""
    run = tmp_path / "run"
    shutil.copytree(straight_run[0], run)
    before = _files(run)
    refused = _run(run, "algo=grpo", "num_steps=5", timeout=300)
    assert refused.returncode != 0
    assert "would change what the run trains (algo.name: 'gift' -> 'grpo'" in refused.stderr, explain(refused)
    assert "resume_allow_changes=[algo]" in refused.stderr
    assert _files(run) == before

    allowed = _run(run, "algo=grpo", "num_steps=5", "resume_allow_changes=[algo]")
    assert allowed.returncode == 0, explain(allowed)
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4, 5]
    history = subprocess.run([sys.executable, str(ROOT / "tools" / "run_history.py"), str(run)], capture_output=True,
                             text=True, timeout=60)
    segments = history.stdout.split("segment ")[1:]
    assert len(segments) == 2 and "from step 0" in segments[0] and "from step 4" in segments[1], history.stdout
    assert "changed algo.name: 'gift' -> 'grpo'" in segments[1] and "changed" not in segments[0]


def test_the_lock_is_exclusive_and_released_when_its_holder_dies(tmp_path):
    """flock: a second holder is refused naming the first; a SIGKILLed holder releases it at once; a lock
    file deleted under its holder is noticed (the trainer checks before every checkpoint write)."""
    with RunLock(tmp_path).acquire("first"):
        with pytest.raises(RunDirBusy, match=f'in use by another process: .*"pid": {os.getpid()}.*"what": "first"'):
            RunLock(tmp_path).acquire("second")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gift_megatron.run_dir import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire('child'); print('held', flush=True); "
                               "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match="child"):
        RunLock(tmp_path).acquire("parent")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    lock = RunLock(tmp_path).acquire("parent")
    assert lock.held()
    (tmp_path / LOCK_NAME).unlink()  # someone deletes the lock file: a second process could now lock it too
    assert not lock.held()
    RunLock(tmp_path).acquire("intruder")
    lock.release()
    assert not lock.held()


def test_what_a_run_means_and_what_may_change():
    saved = meaning({"algo": {"name": "gift", "num_mini_batches": 1}, "data": {"path": "a.jsonl", "seed": 0},
                     "model": {"arch": "llama", "hf_path": None}, "reward": {"terms": [], "num_workers": 4}})
    now = meaning({"algo": {"name": "grpo", "num_mini_batches": 2}, "data": {"path": "b.jsonl", "seed": 0},
                   "model": {"arch": "llama", "hf_path": None}, "reward": {"terms": [], "num_workers": 8}})
    changes = changed_meaning(saved, now)  # mini-batches and reward threads change how, not what
    assert changes == {"algo.name": ("gift", "grpo"), "data.path": ("a.jsonl", "b.jsonl")}
    assert refused_changes(changes, ["algo"]) == {"data.path": ("a.jsonl", "b.jsonl")}
    assert refused_changes(changes, ["algo", "data.path"]) == {}
    assert refused_changes(changes, ["algo.name_x", "dat"]) == changes  # prefixes must be whole fields


def test_a_run_whose_lock_file_is_deleted_stops_before_its_next_write(tmp_path):
    """Deleting RUN_DIR/.gift.lock under a live run would let a second run lock the folder too: the run
    notices before its next checkpoint and stops without writing it."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gift_megatron.train", f"run_dir={run}", *STRAIGHT], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and '"step": 1,' in (run / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        (run / LOCK_NAME).unlink()
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0 and f"{run / LOCK_NAME} was deleted, replaced or moved" in out, out[-3000:]
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step_*"))
