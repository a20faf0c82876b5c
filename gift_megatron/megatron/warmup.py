"""Supervised warm-up of a single-process policy (the embedded default's first stage), cached.

    python -m gift_megatron.warmup_job RUN_DIR/config.yaml CACHE_PATH   # a multi-rank run's warm-up

RL needs a non-zero starting accuracy. The model is trained with teacher forcing on prompt ->
answer + EOS (AdamW on the plain megatron modules, before DDP wraps them) until its held-out exact
accuracy reaches `target_accuracy` (or `max_steps`). Exact accuracy is measured teacher-forced: the
argmax at every answer position equals the answer token, which is exactly when greedy decoding
would produce the answer. Training on the full training set, not a small subset (a subset is
memorised and leaves RL nothing to learn).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from gift_megatron.algo import LossBatch, LossNorm, sft_loss, vocab_parallel_logprobs
from gift_megatron.algo.layout import sequence_lengths, token_budget_bins
from gift_megatron.config import Config, ParallelConfig
from gift_megatron.launch import free_port
from gift_megatron.megatron.checkpoint import save_model_weights
from gift_megatron.megatron.model import build_gpt_models

log = logging.getLogger(__name__)


class Example(Protocol):
    @property
    def prompt_ids(self) -> list[int]: ...
    @property
    def answer_ids(self) -> list[int]: ...


class SupervisedTask(Protocol):
    """What the warm-up needs of a task (gift_megatron.rollout.tasks.TaskData has it): prompt -> answer
    examples for training and held out, and the EOS and padding ids."""

    @property
    def train(self) -> Sequence[Example]: ...
    @property
    def eval(self) -> Sequence[Example]: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...


SINGLE = ParallelConfig(world_size=1, micro_batch_size=1)
WARMUP_CACHE_ENV = "GIFT_WARMUP_CACHE"  # one warm-up cache for every run of a machine (data.warmup_cache_dir wins)


def pad_sequences(prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """tokens_BS (prompt + answer, right-padded) and the answer mask over tokens_BS."""
    S = max(len(p) + len(a) for p, a in zip(prompts, answers))
    tokens = torch.full((len(prompts), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        tokens[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, len(p): len(p) + len(a)] = 1.0
    return tokens, mask


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    S = tokens.shape[1]
    pos = torch.arange(S)[None].expand(tokens.shape[0], -1)
    return model(tokens, pos, torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None])


def _bins(mask_BS: torch.Tensor, max_tokens: int) -> list[tuple[torch.Tensor, int]]:
    """(rows, length) of each micro-batch: all rows at full length, or token-budget bins (as training)."""
    if not max_tokens:
        return [(torch.arange(mask_BS.shape[0]), mask_BS.shape[1])]
    lengths = sequence_lengths(mask_BS).tolist()
    return [(torch.tensor(b), lengths[b[0]]) for b in token_budget_bins(lengths, max_tokens)]


@torch.no_grad()
def exact_accuracy(model, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int, batch: int = 512,
                   max_tokens: int = 0) -> float:
    model.eval()
    hits = []
    for i in range(0, tokens.shape[0], batch):
        for rows, S in _bins(mask[i: i + batch], max_tokens):
            t, m = tokens[i: i + batch][rows, :S], mask[i: i + batch][rows, 1:S]
            pred = _logits(model, t)[:, :-1, :vocab_size].argmax(-1)
            hits.append(((pred == t[:, 1:]) | (m == 0)).all(-1))
    return float(torch.cat(hits).float().mean())


def supervised_warmup(model, train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                      *, vocab_size: int, lr: float = 1e-3, batch_size: int = 128, max_steps: int = 400,
                      target_accuracy: float = 0.15, eval_every: int = 10, seed: int = 0,
                      max_tokens: int = 0, adam_eps: float = 1e-8) -> dict[str, float]:
    """Train `model` (one GPTModel chunk, one process) in place; returns steps, accuracy, nll.
    `max_tokens` > 0: each batch in token-budget micro-batches (gradients accumulated; the same loss)."""
    assert parallel_state.get_tensor_model_parallel_world_size() == 1, "warm-up runs in one process"
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1, "warm-up runs in one process"
    tokens, mask = train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, eps=adam_eps)
    g = torch.Generator().manual_seed(seed)
    accuracy = partial(exact_accuracy, model, *held_out, vocab_size, max_tokens=max_tokens)
    acc, nll, step = accuracy(), float("nan"), 0
    while acc < target_accuracy and step < max_steps:
        model.train()
        idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
        norm = LossNorm(len(idx), float(mask[idx, 1:].sum()), mask.shape[1] - 1)  # the whole batch's counts
        opt.zero_grad()
        total = 0.0
        for rows, S in _bins(mask[idx], max_tokens):
            t, m = tokens[idx[rows], :S], mask[idx[rows], 1:S]
            logp = vocab_parallel_logprobs(_logits(model, t)[:, :-1], t[:, 1:], vocab_size=vocab_size)
            loss, _ = sft_loss(LossBatch(logp, m), norm)  # this micro-batch's share of the batch's mean
            loss.backward()
            total += float(loss.detach())
        opt.step()
        step, nll = step + 1, total
        if step % eval_every == 0:
            acc = accuracy()
            log.info("warm-up step %d: nll %.3f, held-out exact accuracy %.3f", step, nll, acc)
    model.eval()
    return {"warmup_steps": step, "warmup_accuracy": acc, "warmup_nll": nll}


def warmup_cache_path(cfg: Config, cache_root: Path) -> Path:
    """The cache entry of this model + task + warm-up settings (a hash of them)."""
    d = cfg.data
    files = [] if d.name == "addition" else [d.name, d.path, d.eval_path, d.tokenizer, d.prompt_field,
                                             d.answer_field, d.use_chat_template, d.max_prompt_length]
    key = json.dumps([dataclasses.asdict(cfg.model), d.seed, d.num_eval_prompts, d.warmup_target_accuracy,
                      d.warmup_max_steps, d.warmup_lr, d.warmup_batch_size, cfg.seed, *files], sort_keys=True,
                     default=str)  # not the micro-batching: like the trainer's layout, it changes round-off only
    return cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]


def train_warmup(cfg: Config, task: SupervisedTask, path: Path) -> None:
    """Supervised warm-up of a one-process model (prompt -> answer + EOS); weights saved to `path`."""
    (model,) = build_gpt_models(cfg.model, SINGLE, on_gpu=cfg.on_gpu)
    pairs = lambda ss: pad_sequences([s.prompt_ids for s in ss], [s.answer_ids + [task.eos_id] for s in ss],  # noqa: E731
                                     task.pad_id)
    stats = supervised_warmup(model, pairs(task.train), pairs(task.eval), vocab_size=cfg.model.vocab_size,
                              lr=cfg.data.warmup_lr, batch_size=cfg.data.warmup_batch_size,
                              max_steps=cfg.data.warmup_max_steps, target_accuracy=cfg.data.warmup_target_accuracy,
                              seed=cfg.seed, max_tokens=cfg.parallel.max_tokens_per_micro_batch)
    log.info("warm-up done: %s", stats)
    save_model_weights(path, [model])
    (path.parent / f"{path.name}.json").write_text(json.dumps(stats))


def _warmup_in_subprocess(run_dir: Path, path: Path) -> None:
    """A multi-rank run's warm-up: one process of its own (its own one-rank world), while the ranks wait."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID",
                                                              "SLURM_NTASKS", "SLURM_LOCALID", "PMI_RANK",
                                                              "PMI_SIZE", "OMPI_COMM_WORLD_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    subprocess.run([sys.executable, "-m", "gift_megatron.warmup_job", str(run_dir / "config.yaml"), str(path)],
                   env=env, check=True)


def initial_weights(cfg: Config, run_dir: Path, task: SupervisedTask | None) -> Path | None:
    """Collective. model.init_checkpoint, else the cached warm-up (trained now if missing: rank 0, once
    even for concurrent runs), else None (random init)."""
    if cfg.model.init_checkpoint:
        return Path(cfg.model.init_checkpoint)
    if cfg.data.warmup_max_steps == 0:
        return None
    if task is not None and not task.eval:
        raise ValueError("the supervised warm-up stops at a held-out accuracy, but there are no held-out prompts: "
                         "set data.num_eval_prompts > 0 (or data.eval_path), or start from model.init_checkpoint")
    root = cfg.data.warmup_cache_dir or os.environ.get(WARMUP_CACHE_ENV) or run_dir.parent / ".warmup_cache"
    path = warmup_cache_path(cfg, Path(root))
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f"{path.name}.lock", "w") as lock:  # concurrent runs (sweeps) train it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "metadata.json").exists():
                if dist.get_world_size() == 1:
                    assert task is not None, "rank 0 holds the task"
                    train_warmup(cfg, task, path)
                else:
                    _warmup_in_subprocess(run_dir, path)
    dist.barrier()
    log.info("initial weights: %s", path)
    return path
