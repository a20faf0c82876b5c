"""A run folder belongs to one run: the lock that says so, and what a start may do with a used folder.

- `RunLock`: an exclusive `fcntl.flock` on RUN_DIR/.gift.lock, held for the life of the process that
  owns the run (trainer rank 0, a conversion, `tools/verify_checkpoint.py --sign`). The kernel releases
  it when the holder ends, however it ends (SIGKILL, a Slurm requeue), so a stale lock never blocks a
  rerun; a second holder is refused at once, before it touches anything, naming the first (host, PID,
  start time, command). Forked children share the lock (they are part of the run's process tree).
- `holds_a_run` / `move_aside`: `resume=false` on a used folder refuses unless the old run is moved to a
  timestamped folder beside it (`move_old_run=true`): a used folder is never wiped or mixed.
- The run history (RUN_DIR/run_history.jsonl): one row per start (segment) with the step it started at,
  the resolved config, and every change of what the run means that the user allowed.

Pure Python (no torch, no megatron): tools import it on login nodes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)
LOCK_NAME = ".gift.lock"
HISTORY = "run_history.jsonl"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", HISTORY)  # what makes a folder a used run folder


class RunDirBusy(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """`RunLock(folder).acquire(what)` ... `release()`; also a context manager."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._file: TextIO | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self, what: str) -> RunLock:
        """Take the lock or raise RunDirBusy naming its holder; `what` is recorded for the next one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # never truncated before the lock is ours: it names the holder
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its name yet"
            f.close()
            raise RunDirBusy(f"{self.folder} is in use by another process: {holder}. Wait for it to end (or stop it), "
                             f"or use another folder (run_dir=...)") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": what,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}))
        f.flush()
        self._file = f
        return self

    def held(self) -> bool:
        """Whether the lock file at `path` is still the one this process locked: deleted, replaced or moved
        away, another process could lock the folder too (so a run stops before its next write)."""
        if self._file is None:
            return False
        try:
            on_disk, mine = os.stat(self.path), os.fstat(self._file.fileno())
        except FileNotFoundError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(run_dir: Path, resume: bool, move_old_run: bool) -> RunLock:
    """Lock run_dir for a training run. With resume=false a folder that holds a run is refused, or its run
    is moved aside first (move_old_run): a used folder is never wiped or mixed with a new run."""
    lock = RunLock(run_dir).acquire("gift-train")
    if resume or not holds_a_run(run_dir):
        return lock
    if not move_old_run:
        lock.release()
        raise ValueError(f"resume=false, but {run_dir} holds a run (its config, metrics or checkpoints): starting "
                         f"over there would mix or lose it. Add move_old_run=true to move the old run aside (to "
                         f"{Path(run_dir).name}.old-DATE-TIME beside it), or use another folder (run_dir=...)")
    log.warning("resume=false: moved the old run in %s to %s", run_dir, move_aside(run_dir))
    return lock


def owning_run_dir(checkpoint: Path | str) -> Path:
    """The folder whose lock covers a checkpoint: the nearest folder above it with a lock file (a run
    folder), else the folder holding it (never the checkpoint itself: a file added there fails its
    manifest)."""
    checkpoint = Path(checkpoint).resolve()
    for folder in checkpoint.parents:
        if (folder / LOCK_NAME).exists():
            return folder
    return checkpoint.parent


def holds_a_run(run_dir: Path) -> bool:
    """Whether a run has used this folder (a config, metrics, checkpoints or history)."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def move_aside(run_dir: Path, keep: tuple[str, ...] = ("hydra",)) -> Path:
    """Move the old run's files into RUN_DIR.old-YYYYmmdd-HHMMSS beside it; returns that folder. The lock
    stays (this run holds it) and `keep` (Hydra's log folder, open for this run's log) is copied, not moved."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    target.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name in keep:
            shutil.copytree(entry, target / entry.name)
        elif entry.name != LOCK_NAME:
            entry.rename(target / entry.name)
    return target


# --- what a run means: a resume that changes these is refused unless the user allows it -----------------
MEANING = {
    "algo": None,  # every field
    "reward": None,
    "data": ("name", "path", "eval_path", "tokenizer", "prompt_field", "answer_field", "use_chat_template", "seed"),
    "model": ("hf_path", "arch"),  # tensor shapes are compared on their own (they cannot be allowed to change)
}
NOT_MEANING = ("algo.num_mini_batches", "reward.num_workers")  # how it is computed, not what is trained


def meaning(config: dict) -> dict[str, object]:
    """The fields of a resolved config (a plain dict) that define what a run trains: 'section.key' -> value."""
    out = {}
    for section, keys in MEANING.items():
        values = config.get(section, {})
        for key in sorted(values) if keys is None else keys:
            if f"{section}.{key}" not in NOT_MEANING:
                out[f"{section}.{key}"] = values.get(key)
    return out


def changed_meaning(saved: dict, now: dict) -> dict[str, tuple]:
    """'section.key' -> (saved, now) for every meaning field that differs."""
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def refused_changes(changes: dict[str, tuple], allowed: list[str]) -> dict[str, tuple]:
    """The changes that `allowed` (keys or whole sections, e.g. ['algo', 'data.path']) does not cover."""
    return {k: v for k, v in changes.items() if not any(k == a or k.startswith(a + ".") for a in allowed)}


def record_segment(run_dir: Path, start_step: int, config: dict, changes: dict[str, tuple]) -> None:
    """Append this start to the run history (written, flushed and fsynced before training starts)."""
    path = Path(run_dir) / HISTORY
    segment = len(read_history(run_dir))
    row = {"segment": segment, "start_step": start_step, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "host": socket.gethostname(), "git_commit": _git_commit(),
           "changes": {k: list(v) for k, v in changes.items()}, "config": config}
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _git_commit() -> str | None:
    """The source tree's commit, when the package runs from a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
