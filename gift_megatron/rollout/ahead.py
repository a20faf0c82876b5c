"""Rollouts that run ahead of training (`rollout.max_staleness` = k > 0), on global rank 0.

A background thread calls the rollout stage's `next()` with the newest weights the engine holds,
while the trainer trains earlier batches. Versions: the policy after v RL steps is version v, and
step n (1-based) trains with version n - 1. Batch n (the one step n trains) may start generating
once the engine holds version >= n - 1 - k, so its staleness, (n - 1) - its version, is at most k
when step n trains it; the trainer checks that bound on every batch it takes and stops if it is
broken. Batches are generated and taken strictly in order, each exactly once.

At k = 1 the versions do not depend on timing: batch 1 is generated with version 0 and batch n >= 2
with version n - 2 (batch n may start once batch n - 1 is done and version n - 2 is synced, and
version n - 1 needs step n - 1, which needs batch n - 1 done and version n - 2 too: both wait for the
same two events, so batch n always starts before version n - 1 exists). Runs at k = 1 are therefore
reproducible and resume exactly; at k >= 2 a batch's version depends on how fast each side runs.

The engine is never used by two threads at once: weight syncs and evaluations (the trainer's
thread) wait for the generation round in progress and hold the engine until they are done, and no
new round starts while they wait, so a sync never lands inside a round (servers: inside a request).

What a checkpoint adds (`pending`): the batches generated but not yet trained, with the prompt
sampler's position after them; a resume takes them back (`restore`) so nothing is generated twice
or skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import fields

import torch

from gift_megatron.batch import RolloutBatch
from gift_megatron.rollout.engine import SyncStats
from gift_megatron.rollout.stage import Rollout, RolloutStage

log = logging.getLogger(__name__)


class StalenessError(RuntimeError):
    """A batch would train more than k versions after the weights that generated it, or out of order."""


class RolloutsAhead:
    """The `Rollouts` protocol (rollout/stage.py) with generation ahead of training."""

    def __init__(self, stage: RolloutStage, max_staleness: int) -> None:
        if max_staleness < 1:
            raise ValueError(f"RolloutsAhead needs max_staleness >= 1, got {max_staleness} (0: use the stage itself)")
        self.stage, self.k = stage, max_staleness
        self.sampler = stage.sampler
        self._cv = threading.Condition()
        self._ready: deque[Rollout] = deque()
        self._taken = 0  # steps whose batch the trainer has taken
        self._next = 1  # the step the next generated batch is for
        self._busy = False  # a generation round holds the engine
        self._claims = 0  # trainer-thread users of the engine (waiting or holding)
        self._stop = False
        self._error: BaseException | None = None
        self.waited_s: float | None = 0.0  # the trainer's last wait for the engine (a round in progress)
        self._thread = threading.Thread(target=self._generate, name="rollouts-ahead", daemon=True)

    def restore(self, trained: int, pending: Iterable[Rollout], sampler_state: dict[str, int] | None) -> None:
        """After a resume, before the first batch: `trained` steps done, the checkpoint's batches generated
        ahead and the sampler's state after them. They are kept if every one is within this run's bound,
        else all are dropped (batches train in order) and the sampler stays where the trained ones left it."""
        assert self._thread.ident is None, "restore before the first batch"
        pending = list(pending)
        kept = [r for i, r in enumerate(pending) if trained + i - r.version <= self.k]
        if len(kept) < len(pending):  # a resume with a smaller k: regenerate them, nothing skipped
            log.warning("dropping the checkpoint's %d batches generated ahead (staleness over rollout.max_staleness="
                        "%d): their prompts are generated again", len(pending), self.k)
            kept = []
        elif kept:
            assert sampler_state is not None, "a checkpoint's pending batches come with the sampler's state after them"
            self.sampler.load_state_dict(sampler_state)
        self._ready.extend(kept)
        self._taken = trained
        self._next = trained + 1 + len(kept)

    def _started(self) -> None:
        if self._thread.ident is None and not self._stop:  # once, at the first batch
            self._thread.start()

    def _may_start(self) -> bool:
        return not self._claims and self._next - 1 - self.stage.version <= self.k

    def _generate(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._may_start())
                if self._stop:
                    return
                self._busy, step = True, self._next
            try:  # the engine's weights, hence stage.version, cannot change during a round: the batch's version
                rollout = self.stage.next()
            except BaseException as e:  # noqa: BLE001 - raised again in the trainer's thread (next)
                with self._cv:
                    self._error, self._busy = e, False
                    self._cv.notify_all()
                return
            rollout.metrics["rollout_step"] = float(step)
            with self._cv:
                self._ready.append(rollout)
                self._next, self._busy = step + 1, False
                self._cv.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def next(self) -> Rollout:
        """The next step's batch (waits for it); its staleness is checked against k."""
        start = time.perf_counter()
        self._started()
        with self._cv:
            self._cv.wait_for(lambda: self._ready or self._error is not None)
            if not self._ready:
                self._raise_if_failed()
            rollout = self._ready.popleft()
            self._taken += 1
            self._cv.notify_all()
        step, staleness = self._taken, self._taken - 1 - rollout.version
        made_for = rollout.metrics.get("rollout_step", step)
        if made_for != step or not 0 <= staleness <= self.k:
            raise StalenessError(f"step {step} got the batch generated for step {made_for:.0f} with policy version "
                                 f"{rollout.version}: staleness {staleness}, allowed 0..{self.k} "
                                 f"(rollout.max_staleness); the rollout scheduler is broken, not the run's settings")
        rollout.metrics["time_wait_rollout"] = time.perf_counter() - start
        return rollout

    def generated_with(self, version: int) -> Rollout:
        """A batch not yet taken that the engine generated with `version` (the trainer's current weights
        on a verified step), waiting until the generator makes one: it will, since the engine keeps that
        version until the trainer syncs the next one, and the bound lets batch version + 1 + k start."""
        self._started()
        with self._cv:
            found = lambda: next((r for r in self._ready if r.version == version), None)  # noqa: E731
            self._cv.wait_for(lambda: found() is not None or self._error is not None
                              or self.stage.version != version)
            rollout = found()
            if rollout is None:
                self._raise_if_failed()
                raise StalenessError(f"no batch generated with version {version} "
                                     f"(the engine holds {self.stage.version})")
            return rollout

    @contextmanager
    def _engine_turn(self):
        """The engine for the trainer's thread, between generation rounds."""
        start = time.perf_counter()
        with self._cv:
            self._claims += 1
            self._cv.wait_for(lambda: not self._busy)
        self.waited_s = time.perf_counter() - start
        try:
            yield self.stage
        finally:
            with self._cv:
                self._claims -= 1
                self._cv.notify_all()

    def load_weights(self, named_tensors, version: int) -> SyncStats:
        with self._engine_turn() as stage:
            return stage.load_weights(named_tensors, version)  # the stage's version moves: notified on leaving

    def evaluate(self, num_samples: int = 1) -> dict[str, float]:
        with self._engine_turn() as stage:
            return stage.evaluate(num_samples)

    def pending(self) -> tuple[list[Rollout], dict[str, int]]:
        """The batches generated but not yet taken, and the prompt sampler's state after them (a
        consistent pair: taken between generation rounds)."""
        with self._engine_turn() as stage:
            return list(self._ready), stage.sampler.state_dict()

    def close(self) -> None:
        """Stop generating (the round in progress finishes first), then close the stage."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.stage.close()


def rollouts_state(rollouts: list[Rollout]) -> list[dict]:
    """Rollouts as plain data (tensors, numbers, lists) for a checkpoint."""
    return [{"batch": {f.name: getattr(r.batch, f.name) for f in fields(RolloutBatch)}, "metrics": dict(r.metrics),
             "prompts": list(r.prompts), "sampler_state": list(r.sampler_state), "version": r.version}
            for r in rollouts]


def rollouts_from_state(state: list[dict]) -> list[Rollout]:
    return [Rollout(RolloutBatch(**s["batch"]), s["metrics"], s["prompts"], tuple(s["sampler_state"]), s["version"])
            for s in state]


def save_pending(path, rollouts: list[Rollout], sampler_state: dict[str, int]) -> None:
    torch.save({"rollouts": rollouts_state(rollouts), "sampler": sampler_state}, path)


def load_pending(path) -> tuple[list[Rollout], dict[str, int]]:
    state = torch.load(path, weights_only=True)
    return rollouts_from_state(state["rollouts"]), state["sampler"]
