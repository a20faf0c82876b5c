"""Stop requests: a signal handler sets a flag that the trainer reads at step boundaries (pure Python, so
the entry point installs it before the heavy imports)."""

from __future__ import annotations

import os
import signal


class Preempted(Exception):
    """Raised once every rank has seen the stop flag and the checkpoint is written."""

    def __init__(self, message: str, signum: int | None) -> None:
        super().__init__(message)
        self.signum = signum


class StopFlag:
    """Set from a signal handler; read at step boundaries. A Ctrl-C after a stop was requested aborts
    the process at once, without saving: no Python code runs that could swallow it or write a
    checkpoint from inside a step (the guard ends the processes the run started; the kernel releases
    the run folder's lock; an unfinished checkpoint write is removed at the next start)."""

    signum: int | None = None

    @classmethod
    def request(cls, signum: int, frame=None) -> None:
        if signum == signal.SIGINT and cls.signum is not None:
            os.write(2, b"\nsecond interrupt: aborting without saving (the last checkpoint is kept as it was)\n")
            os._exit(128 + signal.SIGINT)
        if cls.signum is None and signum == signal.SIGINT:
            os.write(2, b"\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again aborts without "
                        b"saving)\n")
        cls.signum = cls.signum or signum
