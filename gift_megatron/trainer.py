"""The RL loop: sample prompts -> generate groups -> rewards -> reference/old log-probs -> policy
updates -> weight sync -> eval -> log -> checkpoint. Components come from gift_megatron.setup.

One process (the embedded default): the vLLM engine runs in the trainer's process.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from gift_megatron.algo import build_loss, group_advantages, overlong_penalty
from gift_megatron.algo.advantages import nonconstant_groups
from gift_megatron.config import Config
from gift_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gift_megatron.megatron.train_step import RolloutBatch, compute_logprobs, train_rollout_batch
from gift_megatron.megatron.weight_sync import gather_hf_weights
from gift_megatron.rollout.batch import build_step_batch
from gift_megatron.rollout.verify import logprob_mismatch

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Raised from the SIGTERM/SIGUSR1 handler (Slurm's warning before the time limit)."""


@dataclass
class TaskData:
    """Prompts and answers as token ids, and how a completion is scored."""

    train_prompts: list[list[int]]
    train_answers: list[list[int]]
    eval_prompts: list[list[int]]
    eval_answers: list[list[int]]
    eos_id: int
    pad_id: int

    def reward(self, completion_ids: list[int], answer_ids: list[int]) -> float:
        return 1.0 if list(completion_ids) == list(answer_ids) + [self.eos_id] else 0.0


@dataclass
class Components:
    cfg: Config
    policy: object  # gift_megatron.megatron.policy.Policy
    reference: list | None
    engine: object  # LocalEngine
    task: TaskData
    sampler: object  # PromptSampler
    run_dir: Path
    step: int = 0
    writer: object | None = None
    history: list = field(default_factory=list)


def _rewards(c: Components, idx: list[int], groups) -> torch.Tensor:
    return torch.tensor([c.task.reward(comp.token_ids, c.task.train_answers[i]) for i, g in zip(idx, groups)
                         for comp in g])


def _logprobs(c: Components, chunks, batch: RolloutBatch) -> torch.Tensor:
    return compute_logprobs(chunks, batch, c.cfg.parallel.micro_batch_size, c.cfg.rollout.temperature,
                            c.cfg.model.vocab_size)


def _generate(c: Components) -> tuple[list[int], list, torch.Tensor]:
    cfg = c.cfg
    idx = c.sampler.next(cfg.data.num_prompts_per_step)
    seed = cfg.seed * 1_000_003 + c.sampler.epoch * 10_007 + c.sampler.position  # reproducible on resume
    groups = c.engine.generate([c.task.train_prompts[i] for i in idx], cfg.algo.group_size, seed=seed)
    return idx, groups, _rewards(c, idx, groups)


def _dynamic_sampling(c: Components) -> tuple[list[int], list, torch.Tensor, dict]:
    """DAPO: drop groups whose rewards are all equal and generate more, up to max_sampling_rounds;
    a batch still short after the last round is topped up with dropped groups (zero advantage)."""
    P, G = c.cfg.data.num_prompts_per_step, c.cfg.algo.group_size
    kept, dropped, rounds = [], [], 0
    while len(kept) < P and rounds < c.cfg.algo.max_sampling_rounds:
        idx, groups, rewards = _generate(c)
        informative = nonconstant_groups(rewards, torch.arange(P).repeat_interleave(G), P)
        for j in range(P):
            (kept if informative[j] else dropped).append((idx[j], groups[j], rewards[j * G:(j + 1) * G]))
        rounds += 1
    chosen = (kept + dropped)[:P]
    stats = {"sampling_rounds": rounds, "frac_groups_informative": min(len(kept), P) / P}
    return [x[0] for x in chosen], [x[1] for x in chosen], torch.cat([x[2] for x in chosen]), stats


def rollout_step(c: Components) -> tuple[RolloutBatch, dict, torch.Tensor]:
    """Generate P x G samples, score them, and lay them out as the trainer's batch."""
    cfg, t0 = c.cfg, time.perf_counter()
    if cfg.algo.dynamic_sampling:
        idx, groups, rewards, metrics = _dynamic_sampling(c)
    else:
        (idx, groups, rewards), metrics = _generate(c), {}
    t_gen = time.perf_counter() - t0
    prompts = [c.task.train_prompts[i] for i in idx]
    sb = build_step_batch(prompts, groups, c.task.pad_id)
    shaped = rewards.clone()
    if cfg.algo.overlong_buffer_length:
        shaped += overlong_penalty(sb.response_lengths_B, cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer_length,
                                   cfg.algo.overlong_penalty_factor)
    adv = group_advantages(shaped, sb.group_index_B, len(prompts), estimator=cfg.algo.advantage)
    batch = RolloutBatch(sb.tokens_BS, sb.response_mask_BS, shaped, adv, cfg.algo.group_size)
    tokens = float(sb.response_lengths_B.sum())
    metrics.update(reward=float(rewards.mean()), response_length=float(sb.response_lengths_B.float().mean()),
                   frac_finished=float(sb.finished_B.float().mean()), time_generate=t_gen, tokens_generated=tokens,
                   tokens_per_second=tokens / max(t_gen, 1e-9))
    return batch, metrics, sb.engine_logp_BT


def train_step(c: Components) -> dict[str, float]:
    cfg = c.cfg
    batch, metrics, engine_logp = rollout_step(c)
    t0 = time.perf_counter()
    old = _logprobs(c, c.policy.chunks, batch)
    metrics.update(logprob_mismatch(engine_logp, old, batch.mask_BT))
    if cfg.algo.needs_old_logprobs:
        batch.old_logp_BT = old
    t1 = time.perf_counter()
    if cfg.algo.needs_reference:
        batch.ref_logp_BT = _logprobs(c, c.reference, batch)
    t2 = time.perf_counter()
    steps = train_rollout_batch(c.policy, build_loss(cfg.algo), batch, num_mini_batches=cfg.algo.num_mini_batches,
                                micro_batch_size=cfg.parallel.micro_batch_size, temperature=cfg.rollout.temperature,
                                vocab_size=cfg.model.vocab_size)
    t3 = time.perf_counter()
    sync = c.engine.load_weights(gather_hf_weights(c.policy.chunks, cfg.model))
    for key in steps[-1]:
        metrics[key] = sum(s[key] for s in steps) / len(steps)
    metrics.update(time_old_logprobs=t1 - t0, time_reference=t2 - t1, time_train=t3 - t2, time_sync=sync.seconds,
                   sync_gb_per_s=sync.gb_per_s)
    return metrics


def evaluate(c: Components) -> float:
    """Held-out exact accuracy with greedy decoding."""
    groups = c.engine.generate(c.task.eval_prompts, 1, temperature=0.0)
    hits = [c.task.reward(g[0].token_ids, a) for g, a in zip(groups, c.task.eval_answers)]
    return sum(hits) / len(hits)


def _log(c: Components, metrics: dict) -> None:
    record = {"step": c.step, **metrics}
    c.history.append(record)
    with (c.run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    if c.writer is not None:
        for k, v in metrics.items():
            c.writer.add_scalar(k, v, c.step)


def save(c: Components) -> None:
    save_checkpoint(c.run_dir / "checkpoints", c.step, c.policy, {"sampler": c.sampler.state_dict()},
                    keep_last=c.cfg.keep_last_checkpoints)


def maybe_resume(c: Components) -> bool:
    ckpt = latest_checkpoint(c.run_dir / "checkpoints") if c.cfg.resume else None
    if ckpt is None:
        return False
    state = load_checkpoint(ckpt, c.policy)
    c.sampler.load_state_dict(state["sampler"])
    c.step = int(state["step"])
    c.engine.load_weights(gather_hf_weights(c.policy.chunks, c.cfg.model))
    log.info("resumed from %s (step %d)", ckpt, c.step)
    return True


def run(c: Components) -> dict[str, float]:
    """The loop; SIGTERM/Ctrl-C save a checkpoint before leaving (raised again to the caller)."""
    cfg = c.cfg
    if c.step == 0:
        _log(c, {"eval_accuracy": evaluate(c)})
    bar = tqdm(total=cfg.num_steps, initial=c.step, desc=f"{cfg.algo.name}", unit="step")
    try:
        while c.step < cfg.num_steps:
            metrics = train_step(c)
            c.step += 1
            if c.step % cfg.eval_every == 0 or c.step == cfg.num_steps:
                metrics["eval_accuracy"] = evaluate(c)
            _log(c, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics.get('eval_accuracy', float('nan')):.3f}")
            if c.step % cfg.save_every == 0 or c.step == cfg.num_steps:
                save(c)
    except (KeyboardInterrupt, Preempted):
        log.warning("interrupted at step %d: saving a checkpoint", c.step)
        save(c)
        raise
    finally:
        bar.close()
    evals = [h["eval_accuracy"] for h in c.history if "eval_accuracy" in h]
    return {"first_eval_accuracy": evals[0], "last_eval_accuracy": evals[-1], "steps": c.step}
