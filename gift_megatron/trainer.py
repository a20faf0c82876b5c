"""The RL loop: sample prompts -> generate groups -> rewards -> reference/old log-probs -> policy
updates -> weight sync -> eval -> log -> checkpoint. Components come from gift_megatron.build.

Global rank 0 owns the engine, the task and the rewards: it generates, scores and broadcasts the
step's batch (tensors only) to the other ranks; every rank computes log-probs and trains its shard;
weights are gathered to rank 0 and synced into the engine. A stop signal (SIGTERM/SIGUSR1, Slurm's
warning before the time limit) only sets a flag: it is agreed on by all ranks at the end of the
step, then every rank saves the checkpoint and leaves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gift_megatron.algo import build_loss, group_advantages, overlong_penalty
from gift_megatron.algo.advantages import nonconstant_groups
from gift_megatron.algo.layout import dp_sample_indices
from gift_megatron.config import Config
from gift_megatron.megatron.checkpoint import architecture, load_checkpoint, save_checkpoint
from gift_megatron.megatron.policy import copy_weights, move_chunks
from gift_megatron.megatron.train_step import RolloutBatch, compute_logprobs, train_rollout_batch
from gift_megatron.megatron.weight_sync import gather_hf_weights
from gift_megatron.rollout.batch import build_step_batch
from gift_megatron.rollout.verify import DEFAULT_MAX_MISMATCH, MismatchAlarm, mismatch_stats, summarize

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised once every rank has seen the stop flag and the checkpoint is written."""


class StopFlag:
    """Set from a signal handler; read at step boundaries."""

    signum: int | None = None

    @classmethod
    def request(cls, signum: int, frame=None) -> None:
        cls.signum = signum


@dataclass
class Components:
    cfg: Config
    policy: object  # gift_megatron.megatron.policy.Policy
    reference: list | None
    engine: object | None  # LocalEngine or ServerPool (rank 0 only)
    task: object | None  # gift_megatron.rollout.tasks.TaskData (rank 0 only)
    sampler: object  # PromptSampler (same state on every rank)
    run_dir: Path
    scorer: object | None = None  # GroupScorer (rank 0 only)
    step: int = 0
    writer: object | None = None
    history: list = field(default_factory=list)
    rank0: bool = True
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    alarm: MismatchAlarm | None = None
    resume_from: Path | None = None  # the checkpoint to resume (chosen and checked by build)

    def __post_init__(self) -> None:
        r = self.cfg.rollout
        threshold = r.max_logprob_mismatch or DEFAULT_MAX_MISMATCH[self.cfg.model.params_dtype]
        self.alarm = MismatchAlarm(threshold, r.mismatch_patience, log)


class NonFiniteError(RuntimeError):
    """Too many steps in a row with NaN/Inf losses or gradients."""


def _count_nonfinite(c: Components, metrics: dict) -> None:
    bad = metrics.get("nonfinite", 0.0) > 0  # all-reduced in the train step: the same on every rank
    c.nonfinite_in_a_row = c.nonfinite_in_a_row + 1 if bad else 0
    c.nonfinite_total += bad
    metrics["nonfinite_total"] = float(c.nonfinite_total)


def _check_nonfinite(c: Components) -> None:
    """After the step is logged: every rank raises together."""
    if c.nonfinite_in_a_row >= c.cfg.optim.max_nonfinite_steps:
        raise NonFiniteError(
            f"{c.nonfinite_in_a_row} steps in a row (to step {c.step}) had a NaN/Inf loss or gradient and skipped "
            f"their updates: lower optim.lr, check the rewards and data; the last checkpoint in "
            f"{c.run_dir / 'checkpoints'} holds the last good weights (optim.max_nonfinite_steps)")


def _logprobs(c: Components, chunks, batch: RolloutBatch) -> torch.Tensor:
    return compute_logprobs(chunks, batch, c.cfg.parallel.micro_batch_size, c.cfg.rollout.temperature,
                            c.cfg.model.vocab_size)


def _generate(c: Components) -> tuple[list[int], list, torch.Tensor, dict]:
    """P prompts x G samples, scored as groups arrive (rank 0)."""
    cfg = c.cfg
    idx = c.sampler.next(cfg.data.num_prompts_per_step)
    seed = cfg.seed * 1_000_003 + c.sampler.epoch * 10_007 + c.sampler.position  # reproducible on resume
    samples = [c.task.train[i] for i in idx]
    arrivals = c.engine.generate_iter([s.prompt_ids for s in samples], cfg.algo.group_size, seed=seed)
    groups, rewards, parts = c.scorer.score_all(arrivals, samples)
    return idx, groups, rewards, parts


def _dynamic_sampling(c: Components) -> tuple[list[int], list, torch.Tensor, dict, dict]:
    """DAPO: drop groups whose rewards are all equal and generate more, up to max_sampling_rounds;
    a batch still short after the last round is topped up with dropped groups (zero advantage)."""
    P, G = c.cfg.data.num_prompts_per_step, c.cfg.algo.group_size
    kept, dropped, rounds = [], [], 0
    while len(kept) < P and rounds < c.cfg.algo.max_sampling_rounds:
        idx, groups, rewards, parts = _generate(c)
        informative = nonconstant_groups(rewards, torch.arange(P).repeat_interleave(G), P)
        for j in range(P):
            part = {k: v[j * G:(j + 1) * G] for k, v in parts.items()}
            (kept if informative[j] else dropped).append((idx[j], groups[j], rewards[j * G:(j + 1) * G], part))
        rounds += 1
    chosen = (kept + dropped)[:P]
    stats = {"sampling_rounds": rounds, "frac_groups_informative": min(len(kept), P) / P}
    parts = {k: torch.cat([x[3][k] for x in chosen]) for k in chosen[0][3]}
    return [x[0] for x in chosen], [x[1] for x in chosen], torch.cat([x[2] for x in chosen]), parts, stats


def rollout_step(c: Components) -> tuple[RolloutBatch, dict, torch.Tensor]:
    """Generate P x G samples, score them, and lay them out as the trainer's batch."""
    cfg, t0 = c.cfg, time.perf_counter()
    if cfg.algo.dynamic_sampling:
        idx, groups, rewards, parts, metrics = _dynamic_sampling(c)
    else:
        (idx, groups, rewards, parts), metrics = _generate(c), {}
    t_gen = time.perf_counter() - t0
    prompts = [c.task.train[i].prompt_ids for i in idx]
    sb = build_step_batch(prompts, groups, c.task.pad_id)
    shaped = rewards.clone()
    if cfg.algo.overlong_buffer_length:
        shaped += overlong_penalty(sb.response_lengths_B, cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer_length,
                                   cfg.algo.overlong_penalty_factor)
    adv = group_advantages(shaped, sb.group_index_B, len(prompts), estimator=cfg.algo.advantage)
    batch = RolloutBatch(sb.tokens_BS, sb.response_mask_BS, shaped, adv, cfg.algo.group_size)
    tokens = float(sb.response_lengths_B.sum())
    if len(parts) > 1:
        metrics.update({f"reward_{k}": float(v.mean()) for k, v in parts.items()})
    metrics.update(reward=float(rewards.mean()), response_length=float(sb.response_lengths_B.float().mean()),
                   frac_finished=float(sb.finished_B.float().mean()), time_generate=t_gen, tokens_generated=tokens,
                   tokens_per_second=tokens / max(t_gen, 1e-9))
    return batch, metrics, sb.engine_logp_BT


def _broadcast_batch(c: Components, batch: RolloutBatch | None, engine_logp: torch.Tensor | None):
    """Rank 0's step batch to every rank (tensors only, no pickling), and the sampler's position."""
    if dist.get_world_size() == 1:
        return batch, engine_logp
    header = torch.zeros(4, dtype=torch.long)
    if c.rank0:
        header[:] = torch.tensor([*batch.tokens_BS.shape, c.sampler.epoch, c.sampler.position])
    dist.broadcast(header, 0)
    B, S, epoch, position = header.tolist()
    c.sampler.epoch, c.sampler.position = epoch, position
    if not c.rank0:
        batch = RolloutBatch(torch.empty(B, S, dtype=torch.long), torch.empty(B, S), torch.empty(B), torch.empty(B),
                             c.cfg.algo.group_size)
        engine_logp = torch.empty(B, S - 1)
    for t in (batch.tokens_BS, batch.response_mask_BS, batch.rewards_B, batch.advantages_B, engine_logp):
        dist.broadcast(t, 0)
    return batch, engine_logp


def _local_shard(c: Components, batch: RolloutBatch, engine_logp: torch.Tensor):
    """This DP rank's G/DP samples of every prompt (DESIGN.md's layout)."""
    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return batch, engine_logp
    P, G = batch.tokens_BS.shape[0] // c.cfg.algo.group_size, c.cfg.algo.group_size
    idx = dp_sample_indices(P, G, ps.get_data_parallel_rank(), dp)
    return replace(batch.select(idx), samples_per_prompt=G // dp), engine_logp[idx]


def _mismatch(engine_logp: torch.Tensor, trainer_logp: torch.Tensor | None, mask_BT: torch.Tensor) -> dict:
    """Engine vs trainer log-probs over every rank's samples (the last stage has them; TP ranks agree)."""
    stats = torch.zeros(3, dtype=torch.float64)
    if trainer_logp is not None and ps.get_tensor_model_parallel_rank() == 0:
        stats = mismatch_stats(engine_logp, trainer_logp, mask_BT)
    if dist.get_world_size() > 1:
        peak = stats[2:].clone()
        dist.all_reduce(stats)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats[2] = peak[0]
    return summarize(stats)


def sync_weights(c: Components):
    """Gather the policy (every rank) and load it into the engine (rank 0). Returns rank 0's SyncStats."""
    weights = gather_hf_weights(c.policy.chunks, c.cfg.model)
    if not c.rank0:
        for _ in weights:
            pass
        return None
    return c.engine.load_weights(weights)


def train_step(c: Components) -> dict[str, float]:
    cfg = c.cfg
    batch = engine_logp = None
    metrics: dict[str, float] = {}
    if c.rank0:
        batch, metrics, engine_logp = rollout_step(c)
    batch, engine_logp = _local_shard(c, *_broadcast_batch(c, batch, engine_logp))
    t0 = time.perf_counter()
    verify = cfg.rollout.verify_every > 0 and c.step % cfg.rollout.verify_every == 0
    if verify or cfg.algo.needs_old_logprobs:  # same decision on every rank: c.step is shared
        old = _logprobs(c, c.policy.chunks, batch)
        if verify:  # before the update: a step that trips the alarm trains nothing
            metrics.update(_mismatch(engine_logp, old, batch.mask_BT))
            c.alarm.check(c.step, metrics)
        if cfg.algo.needs_old_logprobs:
            batch.old_logp_BT = old
    t1 = time.perf_counter()
    if cfg.algo.needs_reference:
        if cfg.parallel.offload_reference:  # GPU only (validated): host memory between its passes
            move_chunks(c.reference, "cuda")
        batch.ref_logp_BT = _logprobs(c, c.reference, batch)
        if cfg.parallel.offload_reference:
            move_chunks(c.reference, "cpu")
    t2 = time.perf_counter()
    steps = train_rollout_batch(c.policy, build_loss(cfg.algo), batch, num_mini_batches=cfg.algo.num_mini_batches,
                                micro_batch_size=cfg.parallel.micro_batch_size, temperature=cfg.rollout.temperature,
                                vocab_size=cfg.model.vocab_size)
    t3 = time.perf_counter()
    sync = sync_weights(c)
    refresh = cfg.algo.reference_refresh_every
    if c.reference is not None and refresh and (c.step + 1) % refresh == 0:  # the step being finished
        copy_weights(c.policy.chunks, c.reference)
    for key in steps[-1]:
        metrics[key] = sum(s[key] for s in steps) / len(steps)
    metrics.update(time_old_logprobs=t1 - t0, time_reference=t2 - t1, time_train=t3 - t2)
    if sync is not None:
        metrics.update(time_sync=sync.seconds, sync_gb_per_s=sync.gb_per_s)
    return metrics


def _hits(c: Components, groups: list, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy per completion, reward per completion), flattened over groups."""
    _, totals, parts = c.scorer.score_all(enumerate(groups), samples)
    reward = c.scorer.reward
    hits = parts.get(reward.accuracy_kind)  # already scored when the check is one of the terms
    if hits is None:
        hits = torch.cat([reward.accuracy(g, s) for g, s in zip(groups, samples)])
    return hits.float(), totals


def evaluate(c: Components) -> dict[str, float]:
    """Held-out accuracy (the task's check) and reward with greedy decoding (rank 0); with
    `eval_num_samples` = k > 1 also avg@k (mean accuracy of k sampled answers, at the rollout
    temperature) and pass@k (a prompt counts if any of its k answers is right)."""
    samples, k = c.task.eval, c.cfg.eval_num_samples
    prompts = [s.prompt_ids for s in samples]
    hits, totals = _hits(c, c.engine.generate(prompts, 1, temperature=0.0), samples)
    out = {"eval_accuracy": float(hits.mean()), "eval_reward": float(totals.mean())}
    if k > 1:
        hits_k, _ = _hits(c, c.engine.generate(prompts, k, seed=c.cfg.seed), samples)
        hits_k = hits_k.view(len(samples), k)
        out.update({f"eval_avg@{k}": float(hits_k.mean()), f"eval_pass@{k}": float(hits_k.amax(dim=1).mean())})
    return out


def _log(c: Components, metrics: dict) -> None:
    record = {"step": c.step, **metrics}
    c.history.append(record)
    if not c.rank0:
        return
    with (c.run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    if c.writer is not None:
        for k, v in metrics.items():
            c.writer.add_scalar(k, v, c.step)


def save(c: Components) -> None:
    save_checkpoint(c.run_dir / "checkpoints", c.step, c.policy,
                    {"sampler": c.sampler.state_dict(), "architecture": architecture(c.cfg.model)},
                    keep_last=c.cfg.keep_last_checkpoints, reference=_changing_reference(c))


def _changing_reference(c: Components):
    """The reference chunks when they are not the frozen initial policy (then checkpoints hold them)."""
    return c.reference if c.reference is not None and c.cfg.algo.reference_refresh_every else None


def maybe_resume(c: Components) -> bool:
    """Collective: every rank loads the checkpoint build chose (the newest intact one), if any."""
    if c.resume_from is None:
        return False
    state = load_checkpoint(c.resume_from, c.policy, reference=_changing_reference(c), verify=False)
    c.sampler.load_state_dict(state["sampler"])
    c.step = int(state["step"])
    sync_weights(c)
    if c.rank0:
        log.info("resumed from %s (step %d)", c.resume_from, c.step)
    return True


def _rewind_logs(c: Components) -> None:
    """Drop what an earlier (crashed) run in this folder logged after the step this run starts from:
    those steps run again. A fresh start (step 0) keeps nothing."""
    path = c.run_dir / "metrics.jsonl"
    if path.exists():
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                break
        c.history = [r for r in rows if r["step"] <= c.step] if c.step else []
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in c.history))
        os.replace(tmp, path)
    if c.writer is not None:  # TensorBoard hides events after purge_step written by the crashed run
        log_dir = c.writer.log_dir
        c.writer.close()
        c.writer = type(c.writer)(log_dir, purge_step=c.step + 1 if c.step else 0)


def _stop_requested() -> bool:
    """Whether any rank got a stop signal (agreed by all ranks at the step boundary)."""
    flag = torch.tensor([StopFlag.signum is not None], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _postfix(c: Components, metrics: dict) -> dict[str, str]:
    """The bar's live numbers: reward, the last held-out accuracy, the engine/trainer mismatch."""
    post = {"reward": f"{metrics['reward']:.3f}"}
    evals = [h["eval_accuracy"] for h in c.history if "eval_accuracy" in h]
    if evals:
        post["acc"] = f"{evals[-1]:.3f}"
    if "logprob_diff_mean" in metrics:
        post["mismatch"] = f"{metrics['logprob_diff_mean']:.1e}"
    return post


def _loop(c: Components, bar, evals_on: bool) -> None:
    cfg = c.cfg
    while c.step < cfg.num_steps:
        start = time.perf_counter()
        metrics = train_step(c)
        metrics["time_step"] = time.perf_counter() - start  # generate .. sync, all phases
        c.step += 1
        _count_nonfinite(c, metrics)
        if c.rank0 and evals_on and (c.step % cfg.eval_every == 0 or c.step == cfg.num_steps):
            start = time.perf_counter()
            metrics.update(evaluate(c))
            metrics["time_eval"] = time.perf_counter() - start
        _log(c, metrics)
        _check_nonfinite(c)
        if c.rank0:
            bar.set_postfix(_postfix(c, metrics), refresh=False)
        bar.update(1)
        saved = c.step % cfg.save_every == 0 or c.step == cfg.num_steps
        if saved:
            save(c)
        if _stop_requested():
            if c.rank0:
                log.warning("stop signal: checkpoint at step %d, leaving", c.step)
            if not saved:
                save(c)
            raise Preempted(f"stop signal at step {c.step}")


def run(c: Components) -> dict[str, float]:
    """The loop. A stop signal ends it after the current step with a checkpoint (Preempted raised);
    Ctrl-C in a one-process run saves too."""
    cfg = c.cfg
    if c.rank0:
        _rewind_logs(c)
    evals_on = cfg.data.num_eval_prompts > 0 or cfg.data.eval_path is not None
    if c.step == 0 and c.rank0 and evals_on:
        _log(c, evaluate(c))
    bar = tqdm(total=cfg.num_steps, initial=c.step, desc=f"{cfg.algo.name}", unit="step", disable=not c.rank0)
    try:
        # log lines (ours, and vLLM's own handler's) print above the bar instead of breaking it
        with logging_redirect_tqdm([logging.getLogger(), logging.getLogger("vllm")]):
            _loop(c, bar, evals_on)
    except KeyboardInterrupt:
        if dist.get_world_size() > 1:
            raise  # ranks may be inside different collectives: a collective save could hang
        log.warning("interrupted at step %d: saving a checkpoint", c.step)
        save(c)
        raise
    finally:
        bar.close()
    evals = [h["eval_accuracy"] for h in c.history if "eval_accuracy" in h]
    return {"first_eval_accuracy": evals[0], "last_eval_accuracy": evals[-1], "steps": c.step} if evals else {}


def close(c: Components) -> None:
    """Rank 0: stop the scorer and the engine (call last: the in-process engine ends torch.distributed)."""
    if c.scorer is not None:
        c.scorer.close()
    if c.engine is not None:
        c.engine.close()
    if dist.is_initialized():  # (the in-process engine's shutdown already ended it)
        dist.destroy_process_group()
