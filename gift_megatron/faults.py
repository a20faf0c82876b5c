"""Fault injection for tests: a fault exactly where a test wants it, not where a poll happens to catch it.

    GIFT_FAULT=kill_during_checkpoint_write:2 gift-train ...   # SIGKILLs itself mid-write of checkpoint 2
    GIFT_FAULT=step_train:3:INT gift-train ...                 # a Ctrl-C (SIGINT) after step 3's update
    GIFT_FAULT=step_train:3:INT,checkpoint_data:3:INT ...      # and a second one as checkpoint 3 starts

A hook call names its point and the step; each comma-separated `<point>:<step>[:<signal>]` of
`GIFT_FAULT` makes the process send itself that signal there (default KILL: no cleanup, no handlers,
what a power cut or the OOM killer does; INT, TERM, USR1: what a user or Slurm sends, handled as in a
real run; SERVER: SIGKILL the first vLLM server this process started, API server and engine together,
the trainer itself going on to find it dead). Unset, as in every real run, a hook is one environment
lookup and returns.

Points (`POINTS`), in the order a step reaches them: step_rollout (the batch generated and scored),
step_logprobs (policy and reference log-probs taken), step_train (the update applied), step_sync (the
engine holds the new weights), eval (before a held-out evaluation), checkpoint_data (before the
shards are written), kill_during_checkpoint_write (shards written, no manifest), checkpoint_publish
(manifest written, not renamed into place), checkpoint_prune (published, older ones not yet pruned).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "GIFT_FAULT"
SERVER = "SERVER"
_servers: list[int] = []  # process-group leaders of the vLLM servers this process started
POINTS = ("step_rollout", "step_logprobs", "step_train", "step_sync", "eval", "checkpoint_data",
          "kill_during_checkpoint_write", "checkpoint_publish", "checkpoint_prune")


def started_server(pid: int) -> None:
    """Called by gift_megatron.rollout.servers for each server it starts (its own session): the target of
    a SERVER fault."""
    _servers.append(pid)


def maybe_fail(point: str, step: int) -> None:
    """Test/fault-injection hook: send this process the signal `GIFT_FAULT` names for `<point>:<step>`;
    otherwise return (at once when the variable is unset)."""
    spec = os.environ.get(FAULT_ENV)
    if spec is None:  # unset: no string is built
        return
    here = f"{point}:{step}"
    for fault in spec.split(","):
        where, _, name = fault.partition(":")[2].partition(":")
        if f"{fault.partition(':')[0]}:{where}" != here:
            continue
        if name != SERVER:
            os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
        elif _servers:
            os.killpg(_servers[0], signal.SIGKILL)
        elif int(os.environ.get("RANK", "0")) == 0:  # rank 0 starts the servers: a fault that cannot fire
            raise RuntimeError(f"{FAULT_ENV}={spec}: a SERVER fault at {here}, but this process started no vLLM server")
