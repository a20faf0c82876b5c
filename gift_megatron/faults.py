"""Fault injection for tests: a crash exactly where a test wants it, not where a poll happens to catch it.

    GIFT_FAULT=kill_during_checkpoint_write:2 gift-train ...   # SIGKILLs itself mid-write of checkpoint 2

A hook call names its point and the step; when `GIFT_FAULT` is `<point>:<step>` the process SIGKILLs
itself there (no cleanup, no handlers: what a power cut or the OOM killer does). Unset, as in every
real run, a hook is one environment lookup and returns.

Points: `kill_during_checkpoint_write` (megatron/checkpoint.py's save_checkpoint: every shard file is
written, the manifest is not, the folder is not yet renamed into place).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "GIFT_FAULT"


def maybe_fail(point: str, step: int) -> None:
    """Test/fault-injection hook: SIGKILL this process when `GIFT_FAULT` is `<point>:<step>`;
    otherwise return (at once when the variable is unset)."""
    spec = os.environ.get(FAULT_ENV)
    if spec is not None and spec == f"{point}:{step}":  # unset: no string is built
        os.kill(os.getpid(), signal.SIGKILL)
