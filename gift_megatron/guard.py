"""No orphans: when a trainer process ends, even by SIGKILL, every process it started ends too.

`protect()` starts a small guard process, then re-executes the trainer with a fresh token in its
environment, which every descendant inherits (the in-process vLLM engine core, vLLM servers,
megatron's checkpoint-writer Manager, multiprocessing's resource tracker, reward workers).
The guard waits for the trainer to end, then sends SIGTERM to every process carrying the token and
SIGKILL to those still alive after a grace period. A process group would not do: children that
start their own session (vLLM servers do, so that Ctrl-C reaches the trainer alone) leave the group,
and Slurm/torchrun kill only what they started. Linux only (/proc). A launcher that forwards the
environment to processes that are not the run's own (sbatch does) must empty the token for them:
conf/hydra/launcher/gift_slurm.yaml does.

    python -m gift_megatron.guard PID START_TIME TOKEN     # what protect() starts
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

TOKEN_ENV = "GIFT_PROCESS_TOKEN"
GRACE_S = 10.0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat: tells a reused PID apart);
    None once it has ended (gone, or a zombie waiting for its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def tagged(token: str) -> list[int]:
    """PIDs of the processes whose environment carries the token (our own user's, readable in /proc)."""
    needle, found = f"{TOKEN_ENV}={token}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def reap(token: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every tagged process, SIGKILL what is left after `grace_s`; returns who was signalled."""
    first = tagged(token)
    _signal_all(first, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := tagged(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_all(left, signal.SIGKILL)
    return first


def protect() -> None:
    """Start this process's guard, then re-execute it (same PID, same arguments) with the token in its
    environment: a token set only in os.environ would miss children forked without an exec, whose
    /proc/PID/environ is the environment their parent was started with. Returns at once in the
    re-executed process (and on later calls: Hydra multirun calls main once per job)."""
    if os.environ.get(TOKEN_ENV, "").startswith(f"{os.getpid()}-"):
        return
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    subprocess.Popen([sys.executable, "-m", "gift_megatron.guard", str(os.getpid()), _start_time(os.getpid()) or "0",
                      token], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, dict(env, **{TOKEN_ENV: token}))


def main(argv: list[str]) -> None:
    pid, started, token = int(argv[0]), argv[1], argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the trainer
    while _start_time(pid) == started:
        time.sleep(0.5)
    reap(token)


if __name__ == "__main__":
    main(sys.argv[1:])
