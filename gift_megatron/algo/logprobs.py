"""Vocab-parallel log-probs and entropy from logits sharded over a tensor-parallel group.

Legend: B = sequences, T = positions, V = local vocabulary shard (this rank's columns).

Each TP rank holds logits_BTV for vocabulary ids [vocab_start, vocab_start + V). The full-vocabulary
logits are never gathered: the row max (MAX), the sum of exponentials (SUM) and the target logit
(SUM, non-zero only on the owning rank) are all-reduced: 3 x B x T numbers, independent of the
vocabulary size. Both functions compute in float32 and have hand-written backwards that need no
communication: d logp / d logit_j = 1[j = target] - softmax_j, and d H / d logit_j = -p_j (x_j - E_p x).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _shifted_and_lse(logits_BTV: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits minus the global row max (float32) and the global log-sum-exp of those."""
    x_BTV = logits_BTV.float()
    max_BT = _all_reduce(x_BTV.detach().amax(dim=-1), dist.ReduceOp.MAX, group)
    x_BTV = x_BTV - max_BT.unsqueeze(-1)
    sumexp_BT = _all_reduce(x_BTV.exp().sum(dim=-1), dist.ReduceOp.SUM, group)
    return x_BTV, sumexp_BT.log()


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_BTV, target_BT, vocab_start, group):
        x_BTV, lse_BT = _shifted_and_lse(logits_BTV, group)
        vocab_local = x_BTV.shape[-1]
        local_BT = target_BT - vocab_start
        owned_BT = (local_BT >= 0) & (local_BT < vocab_local)
        local_BT = local_BT.clamp(0, vocab_local - 1)
        target_logit_BT = x_BTV.gather(-1, local_BT.unsqueeze(-1)).squeeze(-1) * owned_BT
        target_logit_BT = _all_reduce(target_logit_BT, dist.ReduceOp.SUM, group)
        softmax_BTV = x_BTV.sub_(lse_BT.unsqueeze(-1)).exp_()  # reuse the buffer: softmax for backward
        ctx.save_for_backward(softmax_BTV, local_BT, owned_BT)
        ctx.in_dtype = logits_BTV.dtype
        return target_logit_BT - lse_BT

    @staticmethod
    def backward(ctx, grad_BT):
        softmax_BTV, local_BT, owned_BT = ctx.saved_tensors
        grad_BTV = softmax_BTV * (-grad_BT.unsqueeze(-1))
        grad_BTV.scatter_add_(-1, local_BT.unsqueeze(-1), (grad_BT * owned_BT).unsqueeze(-1))
        return grad_BTV.to(ctx.in_dtype), None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_BTV, group):
        x_BTV, lse_BT = _shifted_and_lse(logits_BTV, group)
        p_BTV = (x_BTV - lse_BT.unsqueeze(-1)).exp()
        expected_x_BT = _all_reduce((p_BTV * x_BTV).sum(dim=-1), dist.ReduceOp.SUM, group)
        ctx.save_for_backward(x_BTV, lse_BT, expected_x_BT)
        ctx.in_dtype = logits_BTV.dtype
        return lse_BT - expected_x_BT

    @staticmethod
    def backward(ctx, grad_BT):
        x_BTV, lse_BT, expected_x_BT = ctx.saved_tensors
        p_BTV = (x_BTV - lse_BT.unsqueeze(-1)).exp()
        grad_BTV = -p_BTV * (x_BTV - expected_x_BT.unsqueeze(-1)) * grad_BT.unsqueeze(-1)
        return grad_BTV.to(ctx.in_dtype), None


def _shard(logits_BTV: torch.Tensor, group: dist.ProcessGroup | None, vocab_size: int | None):
    """(this rank's first vocabulary id, its logits without padded columns >= vocab_size)."""
    rank = 0 if group is None or not dist.is_initialized() else dist.get_rank(group)
    start = rank * logits_BTV.shape[-1]
    if vocab_size is not None and start + logits_BTV.shape[-1] > vocab_size:
        assert vocab_size > start, "a TP rank holds only padding: pad the vocabulary less"
        logits_BTV = logits_BTV[..., : vocab_size - start]
    return start, logits_BTV


def vocab_parallel_logprobs(
    logits_BTV: torch.Tensor,
    target_BT: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] with the vocabulary sharded over `tp_group`.

    Shards are contiguous and equal-sized (megatron-core's VocabParallelEmbedding layout): rank r
    holds ids [r * V, (r + 1) * V). Columns at ids >= `vocab_size` (Megatron's TP padding) are left
    out of the softmax and get no gradient. Returns float32 logp_BT; differentiable in the logits.
    """
    start, logits_BTV = _shard(logits_BTV, tp_group, vocab_size)
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    return _VocabParallelLogProb.apply(logits_BTV, target_BT, start, tp_group)


def vocab_parallel_entropy(
    logits_BTV: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position, vocabulary sharded over `tp_group`."""
    _, logits_BTV = _shard(logits_BTV, tp_group, vocab_size)
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    return _VocabParallelEntropy.apply(logits_BTV, tp_group)
