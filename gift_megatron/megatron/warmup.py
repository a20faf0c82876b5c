"""Supervised warm-up of a single-process policy (the embedded default's first stage).

RL needs a non-zero starting accuracy. The model is trained with teacher forcing on prompt ->
answer + EOS (AdamW on the plain megatron modules, before DDP wraps them) until its held-out exact
accuracy reaches `target_accuracy` (or `max_steps`). Exact accuracy is measured teacher-forced: the
argmax at every answer position equals the answer token, which is exactly when greedy decoding
would produce the answer. Training on the full training set, not a small subset (a subset is
memorised and leaves RL nothing to learn).
"""

from __future__ import annotations

import logging

import torch
from megatron.core import parallel_state

from gift_megatron.algo import vocab_parallel_logprobs

log = logging.getLogger(__name__)


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


@torch.no_grad()
def exact_accuracy(model, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int, batch: int = 512) -> float:
    model.eval()
    hits = []
    for i in range(0, tokens.shape[0], batch):
        t, m = tokens[i: i + batch], mask[i: i + batch, 1:]
        pred = _logits(model, t)[:, :-1, :vocab_size].argmax(-1)
        hits.append(((pred == t[:, 1:]) | (m == 0)).all(-1))
    return float(torch.cat(hits).float().mean())


def supervised_warmup(model, train: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor],
                      *, vocab_size: int, lr: float = 1e-3, batch_size: int = 128, max_steps: int = 400,
                      target_accuracy: float = 0.15, eval_every: int = 10, seed: int = 0) -> dict[str, float]:
    """Train `model` (one GPTModel chunk, one process) in place; returns steps, accuracy, nll."""
    assert parallel_state.get_tensor_model_parallel_world_size() == 1, "warm-up runs in one process"
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1, "warm-up runs in one process"
    tokens, mask = train
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    acc, nll, step = exact_accuracy(model, *held_out, vocab_size), float("nan"), 0
    while acc < target_accuracy and step < max_steps:
        model.train()
        idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
        t, m = tokens[idx], mask[idx, 1:]
        logp = vocab_parallel_logprobs(_logits(model, t)[:, :-1], t[:, 1:], vocab_size=vocab_size)
        loss = -(logp * m).sum() / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step, nll = step + 1, float(loss)
        if step % eval_every == 0:
            acc = exact_accuracy(model, *held_out, vocab_size)
            log.info("warm-up step %d: nll %.3f, held-out exact accuracy %.3f", step, nll, acc)
    model.eval()
    return {"warmup_steps": step, "warmup_accuracy": acc, "warmup_nll": nll}
