"""The RL loop. `Trainer.step` is one GIFT (or GRPO / DAPO / GSPO) step, read top to bottom:

1. collect scored groups (rank 0, `RolloutStage.next`, rollout/stage.py): P prompts x G samples,
   explicit rewards r and the advantages A = (r - mean_g r) / (std_g r + eps)
   (algo/advantages.py `group_advantages`);
2. this rank's shard (megatron/sharding.py): rank 0's batch broadcast, G/DP samples of each prompt;
3. log-probs of the sampled tokens under the three policies: `behaviour_logp` came with the batch
   (the engine's, the weights that generated); the trainer's at the step's start, `proximal_logp`,
   are checked against them (a wrong sync stops the run before it trains on it) and kept for
   PPO-style losses; `ref_logp` are the reference's;
4. the update: one `train_mini_batch` (megatron/train_step.py) per mini-batch with `self.loss`
   (algo.build_loss, built once): for GIFT `gift_loss` (algo/losses.py), where the implicit reward
   s = sum_t (log pi - log pi_ref) is z-scored per prompt, z all-reduced over DP (algo/grouping.py),
   and the loss is mean_i (A_i - z_i)^2;
5. weight sync into the engine, and every `algo.reference_refresh_every` steps a new reference.

With `rollout.max_staleness` = k > 0, step 1 takes a batch generated ahead on a background thread
(rollout/ahead.py) by weights at most k versions older; the engine check then runs on the batch
generated with this step's weights (`_verify_ahead`), and checkpoints hold the batches not yet trained.

Global rank 0 owns the rollout stage (engine, task, rewards); every rank trains its shard. A stop
signal (SIGTERM/SIGUSR1, Slurm's warning before the time limit, or one Ctrl-C) only sets a flag: all
ranks agree on it at the end of the step, save the checkpoint and leave. Nothing saves from inside a
step: a checkpoint is only ever the state at a step boundary. A second Ctrl-C aborts at once without
saving (the last checkpoint stays as it was).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gift_megatron.algo import build_group_statistics, build_loss
from gift_megatron.batch import RolloutBatch
from gift_megatron.config import Config
from gift_megatron.faults import maybe_fail
from gift_megatron.manifest import CorruptCheckpoint
from gift_megatron.megatron.checkpoint import (
    STATE,
    architecture,
    load_checkpoint,
    read_state,
    save_checkpoint,
    weights_finite,
)
from gift_megatron.megatron.policy import Chunk, Policy, copy_weights, move_chunks
from gift_megatron.megatron.sharding import broadcast_rollout, dp_shard, logprob_mismatch
from gift_megatron.megatron.train_step import MicroBatching, StageLogprobs, compute_logprobs, train_mini_batch
from gift_megatron.megatron.weight_sync import gather_hf_weights
from gift_megatron.metrics_log import MetricsLog
from gift_megatron.mismatch import DEFAULT_MAX_MISMATCH, MismatchAlarm
from gift_megatron.rollout.ahead import load_pending, save_pending
from gift_megatron.rollout.data import PromptSampler
from gift_megatron.rollout.stage import Rollout, Rollouts
from gift_megatron.run_dir import LOCK_NAME, RunDirBusy, RunLock
from gift_megatron.stop import Preempted, StopFlag

log = logging.getLogger(__name__)
PENDING_FILE = "rollouts_ahead.pt"  # in a checkpoint: batches generated ahead, not yet trained (rank 0)


class NonFiniteError(RuntimeError):
    """Too many steps in a row with NaN/Inf losses or gradients."""


class NonFiniteGuard:
    """Counts steps whose update was skipped for a NaN/Inf loss or gradient (the flag is all-reduced
    in the train step: the same on every rank, so every rank raises together)."""

    def __init__(self, max_in_a_row: int, checkpoints: Path) -> None:
        self.max_in_a_row, self.checkpoints = max_in_a_row, checkpoints
        self.in_a_row = self.total = 0

    def count(self, metrics: dict[str, float]) -> None:
        bad = metrics.get("nonfinite", 0.0) > 0
        self.in_a_row = self.in_a_row + 1 if bad else 0
        self.total += bad
        metrics["nonfinite_total"] = float(self.total)

    def check(self, step: int) -> None:
        """After the step is logged."""
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row (to step {step}) had a NaN/Inf loss or gradient and skipped their "
                f"updates: lower optim.lr, check the rewards and data; the last checkpoint in {self.checkpoints} "
                f"holds the last good weights (optim.max_nonfinite_steps)")


@dataclass
class TrainState:
    """What a checkpoint holds besides weights and optimizer: the steps done and the prompt sampler's
    position (the same on every rank)."""

    sampler: PromptSampler
    step: int = 0
    optimizer_steps: int = 0
    """Updates applied (skipped ones not counted): checked on resume against the LR schedule's and Adam's."""
    last_update_skipped: bool = False
    """Whether the last step skipped an update for a NaN/Inf (its checkpoint never displaces a good one)."""


class PhaseTimer:
    """`with timer("train"): ...` records time_train (seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[f"time_{phase}"] = time.perf_counter() - start


class Trainer:
    def __init__(self, cfg: Config, policy: Policy, reference: list[Chunk] | None, rollouts: Rollouts | None,
                 state: TrainState, run_dir: Path, resume_from: Path | None = None, meaning: dict | None = None,
                 lock: RunLock | None = None) -> None:
        self.cfg, self.policy, self.reference, self.rollouts = cfg, policy, reference, rollouts
        self.state, self.run_dir, self.resume_from = state, run_dir, resume_from
        self.meaning, self.lock = meaning or {}, lock  # what the run trains (run_dir.py); rank 0 holds run_dir
        self.rank0 = dist.get_rank() == 0  # owns `rollouts`
        self.loss = build_loss(cfg.algo)  # GIFT: algo/losses.py gift_loss
        p = cfg.parallel
        self.batching = MicroBatching(p.micro_batch_size, p.max_tokens_per_micro_batch,
                                      p.tensor_model_parallel_size if p.sequence_parallel else 1, p.sequence_packing)
        # GIFT under token budgets: whole-group statistics before micro-batches cut groups
        self.group_statistics = build_group_statistics(cfg.algo) if p.max_tokens_per_micro_batch else None
        self.metrics = MetricsLog(run_dir, writes=self.rank0, cfg=cfg)  # + W&B / MLflow runs (logger.backends)
        r = cfg.rollout
        self.alarm = MismatchAlarm(r.max_logprob_mismatch or DEFAULT_MAX_MISMATCH[cfg.model.params_dtype],
                                   r.mismatch_patience, log)
        self.nonfinite = NonFiniteGuard(cfg.optim.max_nonfinite_steps, run_dir / "checkpoints")

    @property
    def rollout_side(self) -> Rollouts:
        """The rollout side (engine, task, rewards), which only global rank 0 holds."""
        assert self.rollouts is not None, "only global rank 0 holds the rollout side"
        return self.rollouts

    def step(self) -> dict[str, float]:
        """One RL step (the module docstring's 1-5); its metrics, the rollout's on rank 0 only."""
        n, timer, algo = self.state.step + 1, PhaseTimer(), self.cfg.algo
        rollout = self.rollout_side.next() if self.rank0 else None  # 1. scored groups with A
        maybe_fail("step_rollout", n)
        metrics = dict(rollout.metrics) if rollout else {}
        batch, version = self._shard(rollout)  # 2. (with behaviour_logp_BT, the engine's)
        metrics["staleness"] = float(n - 1 - version)  # policy versions between generating and training weights
        with timer("policy_logprobs"):  # 3. the proximal policy's (this step's start), checked against the engine's
            logp, checked = self._policy_logprobs(batch, n, fresh=version == n - 1)
            metrics |= checked
        with timer("reference"):
            batch.ref_logp_BT = self._reference_logprobs(batch)
        if self._verified(n) and version != n - 1:
            with timer("verify"):
                metrics |= self._verify_ahead(n)
        maybe_fail("step_logprobs", n)
        with timer("train"):  # 4. one optimizer step per mini-batch with the loss (GIFT: gift_loss)
            parts = batch.mini_batches(algo.num_mini_batches)
            first = logp.rows(slice(0, len(parts[0]))) if logp is not None else None  # later: the weights moved
            updates = [train_mini_batch(self.policy, self.loss, part, batching=self.batching,
                                        temperature=self.cfg.rollout.temperature, vocab_size=self.cfg.model.vocab_size,
                                        entropy=self.cfg.log_entropy, group_statistics=self.group_statistics,
                                        initial_logp=first if i == 0 else None)
                       for i, part in enumerate(parts)]
        metrics |= _mean_over_updates(updates)
        applied = sum(u["update_skipped"] == 0 for u in updates)
        self.state.optimizer_steps += applied
        self.state.last_update_skipped = applied < len(updates)
        metrics["tokens"] = sum(u["tokens"] for u in updates)  # sequence positions trained, all DP ranks
        metrics["trainer_tokens_per_s"] = metrics["tokens"] / sum(timer.seconds.values())
        if not weights_finite(self.policy.chunks):  # a finite gradient can still overflow the weights (huge lr)
            raise NonFiniteError(f"step {n}'s update left the policy's weights non-finite (NaN/Inf): lower optim.lr "
                                 f"(or optim.weight_decay); the last checkpoint in {self.run_dir / 'checkpoints'} "
                                 f"holds the last good weights, and the engine never got these")
        maybe_fail("step_train", n)
        metrics |= self.sync_weights(n)  # 5.
        maybe_fail("step_sync", n)
        if self.reference is not None and algo.reference_refresh_every and n % algo.reference_refresh_every == 0:
            copy_weights(self.policy.chunks, self.reference)
        self.state.step = n
        return metrics | timer.seconds

    def _shard(self, rollout: Rollout | None) -> tuple[RolloutBatch, int]:
        """Rank 0's batch on every rank with the sampler's position after it and the policy version that
        generated it, then this DP rank's share."""
        sampler = self.state.sampler
        extra = [*rollout.sampler_state, rollout.version] if rollout else [0, 0, 0]
        batch, (sampler.epoch, sampler.position, version) = broadcast_rollout(
            rollout.batch if rollout else None, extra, self.cfg.algo.group_size)
        return dp_shard(batch), version

    def _logprobs(self, chunks, batch: RolloutBatch) -> torch.Tensor | None:
        return compute_logprobs(chunks, batch, self.batching, self.cfg.rollout.temperature, self.cfg.model.vocab_size)

    def _verified(self, n: int) -> bool:
        """Whether step n checks the engine against the trainer: the first and every verify_every-th."""
        every = self.cfg.rollout.verify_every
        return every > 0 and (n - 1) % every == 0

    def _policy_logprobs(self, batch: RolloutBatch, n: int, fresh: bool) -> tuple[StageLogprobs | None, dict]:
        """The proximal policy's log-probs (the trainer's weights before the update), when needed: checked
        against the engine's (behaviour) on verified steps when the batch was generated with these weights
        (`fresh`; the alarm stops the run before this step trains), kept as `proximal_logp_BT` for
        PPO-style losses, and GIFT's whole-group statistics under token budgets. None on every rank or none."""
        verify, metrics = fresh and self._verified(n), dict[str, float]()
        if not (verify or self.cfg.algo.needs_proximal_logprobs or self.group_statistics):
            return None, metrics
        logp = self._logprobs(self.policy.chunks, batch)
        if verify:
            metrics = logprob_mismatch(batch, logp)
            self.alarm.check(n, metrics)
        if self.cfg.algo.needs_proximal_logprobs:
            batch.proximal_logp_BT = logp
        return StageLogprobs(logp), metrics

    def _verify_ahead(self, n: int) -> dict[str, float]:
        """A verified step whose batch is stale: the engine is checked on a batch generated ahead with the
        trainer's current weights (version n - 1), before this step's update moves them (waiting for
        that batch if the generator has not finished it). Costs one forward pass over it."""
        ahead = self.rollout_side.generated_with(n - 1).batch if self.rank0 else None
        batch, _ = broadcast_rollout(ahead, [], self.cfg.algo.group_size)
        batch = dp_shard(batch)
        metrics = logprob_mismatch(batch, self._logprobs(self.policy.chunks, batch))
        self.alarm.check(n, metrics)
        return metrics

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        """The reference's log-probs when the algorithm has one (GIFT's baseline, a KL term)."""
        if not self.cfg.algo.needs_reference:
            return None
        assert self.reference is not None, "build makes a reference whenever the algorithm needs one"
        offload = self.cfg.parallel.offload_reference  # GPU only (validated): host memory between passes
        if offload:
            move_chunks(self.reference, "cuda")
        logp = self._logprobs(self.reference, batch)
        if offload:
            move_chunks(self.reference, "cpu")
        return logp

    def sync_weights(self, version: int) -> dict[str, float]:
        """Collective: gather the policy after `version` steps (every rank) and load it into the engine
        (rank 0; with rollouts ahead, between two generation rounds)."""
        weights = gather_hf_weights(self.policy.chunks, self.cfg.model)  # other ranks: sent, nothing back
        if not self.rank0:
            return {}
        sync = self.rollout_side.load_weights(weights, version)
        metrics = {"time_sync": sync.seconds, "sync_gb_per_s": sync.gb_per_s}
        if self.rollout_side.waited_s is not None:  # rollouts ahead: the sync waited for the round in progress
            metrics["time_wait_round"] = self.rollout_side.waited_s
        return metrics

    def _checkpointed_reference(self) -> list[Chunk] | None:
        """The reference chunks when they are not the frozen initial policy (then checkpoints hold them)."""
        return self.reference if self.reference is not None and self.cfg.algo.reference_refresh_every else None

    def save(self) -> None:
        """Collective, at a step boundary only. With rollouts ahead, rank 0 adds the batches generated but
        not yet trained. state.json records what `resume` cross-checks: the step, the optimizer steps,
        the sampler, the pending batches, and what the run trains."""
        self._check_lock()
        files, pending = {}, {"count": 0, "versions": []}
        batches, after = self.rollout_side.pending() if self.rank0 else ([], {})
        if batches:  # rollouts ahead: generated, not yet trained (and the sampler's state after them)
            files[PENDING_FILE] = lambda path: save_pending(path, batches, after)
            pending = {"count": len(batches), "versions": [b.version for b in batches]}
        sampler = self.state.sampler.state_dict()
        run_state = {"optimizer_steps": self.state.optimizer_steps, "sampler": sampler, "pending": pending,
                     "update_skipped": self.state.last_update_skipped, "meaning": self.meaning}
        save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.policy,
                        {"sampler": sampler, "architecture": architecture(self.cfg.model)},
                        keep_last=self.cfg.keep_last_checkpoints, reference=self._checkpointed_reference(),
                        rank0_files=files, run_state=run_state)

    def _check_lock(self) -> None:
        """Collective: stop before writing when rank 0 no longer holds run_dir's lock (its lock file was
        deleted or replaced, or the folder moved: another process may be writing there)."""
        lost = torch.tensor([self.lock is not None and not self.lock.held()], dtype=torch.long)
        if dist.get_world_size() > 1:
            dist.all_reduce(lost, op=dist.ReduceOp.MAX)
        if lost.item():
            raise RunDirBusy(f"{self.run_dir / LOCK_NAME} was deleted, replaced or moved while this run held it: "
                             f"another process may be using {self.run_dir}, so nothing more is written there. "
                             f"Check what else uses the folder, then rerun the command to resume")

    def resume(self) -> None:
        """Collective: every rank loads the checkpoint build chose (the newest that verifies), if any; the
        parts written apart must agree (checkpoint.py `_cross_check`, and the pending batches here)."""
        if self.resume_from is None:
            return
        state = load_checkpoint(self.resume_from, self.policy, reference=self._checkpointed_reference(), verify=False)
        summary = read_state(self.resume_from) or {}  # load_checkpoint verified it: an older one may have none
        self.state.sampler.load_state_dict(state["sampler"])
        self.state.step = int(state["step"])
        self.state.optimizer_steps = int(summary.get("optimizer_steps", self.policy.scheduler.num_steps))
        self.state.last_update_skipped = bool(summary.get("update_skipped", False))
        if self.rank0:
            self.rollout_side.sampler.load_state_dict(state["sampler"])  # the stage's: after the batches trained
            self.rollout_side.restore(self.state.step, *self._saved_pending(summary))
        self.sync_weights(self.state.step)
        if self.rank0:
            log.info("resumed from %s (step %d)", self.resume_from, self.state.step)

    def _saved_pending(self, summary: dict) -> tuple[list[Rollout], dict[str, int] | None]:
        """The checkpoint's batches generated ahead, checked against what state.json says it holds."""
        assert self.resume_from is not None
        saved = self.resume_from / PENDING_FILE
        pending, sampler = load_pending(saved) if saved.exists() else ([], None)
        want = summary.get("pending", {"count": 0, "versions": []})
        versions = [r.version for r in pending]
        got = {"count": len(pending), "versions": versions}
        if got != want or any(v > self.state.step for v in versions):
            raise CorruptCheckpoint(f"{self.resume_from}: its batches generated ahead ({got}) disagree with "
                                    f"{STATE} ({want}) at step {self.state.step}: resume from an older checkpoint")
        return pending, sampler

    def _evaluate(self) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.rollout_side.evaluate(self.cfg.eval_num_samples)
        return metrics | {"time_eval": time.perf_counter() - start}

    def run(self) -> dict[str, float]:
        """The loop. A stop signal ends it after the current step with a checkpoint (Preempted raised)."""
        cfg = self.cfg
        if self.rank0:
            self.metrics.rewind(self.state.step)
        evals_on = cfg.data.num_eval_prompts > 0 or cfg.data.eval_path is not None
        if self.state.step == 0 and self.rank0 and evals_on:
            self.metrics.add(0, self.rollout_side.evaluate(cfg.eval_num_samples))
        bar = tqdm(total=cfg.num_steps, initial=self.state.step, desc=cfg.algo.name, unit="step",
                   disable=not self.rank0)
        try:
            # log lines (ours, and vLLM's own handler's) print above the bar instead of breaking it
            with logging_redirect_tqdm([logging.getLogger(), logging.getLogger("vllm")]):
                while self.state.step < cfg.num_steps:
                    self._step_and_log(bar, evals_on)
        finally:
            bar.close()
        evals = self.metrics.evals()
        return {"first_eval_accuracy": evals[0], "last_eval_accuracy": evals[-1],
                "steps": self.state.step} if evals else {}

    def _step_and_log(self, bar, evals_on: bool) -> None:
        """A step, then (every eval_every and at the last) an eval, the log line, the checkpoint, and
        the stop flag agreed by every rank."""
        cfg, start = self.cfg, time.perf_counter()
        metrics = self.step()
        metrics["time_step"] = time.perf_counter() - start  # generate .. sync, all phases
        n = self.state.step
        self.nonfinite.count(metrics)
        if self.rank0 and evals_on and (n % cfg.eval_every == 0 or n == cfg.num_steps):
            maybe_fail("eval", n)
            metrics |= self._evaluate()
        self.metrics.add(n, metrics)
        self.nonfinite.check(n)
        if self.rank0:
            bar.set_postfix(self.metrics.postfix(metrics), refresh=False)
        bar.update(1)
        saved = n % cfg.save_every == 0 or n == cfg.num_steps
        if saved:
            self.save()
        if _stop_requested():
            if self.rank0:
                log.warning("stop signal: checkpoint at step %d, leaving", n)
            if not saved:
                self.save()
            raise Preempted(f"stop signal at step {n}", StopFlag.signum)

    def close(self) -> None:
        """Stop the rollout stage (rank 0), then torch.distributed (the in-process engine's shutdown may
        already have ended it)."""
        self.metrics.close()
        if self.rollouts is not None:
            self.rollouts.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.lock is not None:
            self.lock.release()


def _mean_over_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the mini-batches that have it: a mini-batch whose metric had no value
    anywhere (e.g. GIFT's log_beta_* with no informative group) leaves it out."""
    keys = dict.fromkeys(k for u in updates for k in u)
    return {k: sum(u[k] for u in updates if k in u) / sum(k in u for u in updates) for k in keys}


def _stop_requested() -> bool:
    """Whether any rank got a stop signal (agreed by all ranks at the step boundary)."""
    flag = torch.tensor([StopFlag.signum is not None], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
