"""The train step: megatron-core schedules over micro-batches, vocab-parallel log-probs, algo losses.

Legend: B = samples on this DP rank, S = sequence positions, T = S - 1 predicted positions.

A `RolloutBatch` (rollout/batch.py) is this DP rank's share of one mini-batch, prompt-major (G/DP samples of each
prompt in turn). Micro-batches are contiguous slices of `micro_batch_size` samples: whole groups, the
same prompts on every DP rank (DESIGN.md). The forward step runs the model chunk; on the last
pipeline stage the loss function turns the vocab-sharded logits into log-probs and calls the
algorithm's loss with the DP group. Pipelining (none, 1F1B, interleaved) is megatron-core's
`get_forward_backward_func`, chosen from the parallel state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from gift_megatron.algo import LossBatch, LossNorm, global_norm, vocab_parallel_entropy, vocab_parallel_logprobs
from gift_megatron.rollout.batch import RolloutBatch


def _causal_mask(seq_len: int, device) -> torch.Tensor:
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def micro_batches(batch: RolloutBatch, micro_batch_size: int) -> list[RolloutBatch]:
    B = batch.tokens_BS.shape[0]
    assert B % micro_batch_size == 0 and micro_batch_size % batch.samples_per_prompt == 0, (B, micro_batch_size)
    return [batch.select(slice(i, i + micro_batch_size)) for i in range(0, B, micro_batch_size)]


@dataclass
class StepContext:
    """What the loss function needs besides the micro-batch."""

    loss_fn: Callable | None  # algo loss; None: forward-only log-prob collection
    norm: LossNorm | None
    temperature: float
    vocab_size: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    entropy: bool = True  # also the mean token entropy (a full-vocabulary pass over the logits)


def _loss_func(mb: RolloutBatch, ctx: StepContext, logits_BSV: torch.Tensor):
    """Last pipeline stage: vocab-sharded logits -> log-probs -> the algorithm's loss (GIFT:
    algo/losses.py gift_loss). Metrics stay tensors; `_reduce_metrics` reduces them after the schedule."""
    target_BT = mb.tokens_BS[:, 1:]
    logits_BTV = logits_BSV[:, :-1]
    logp_BT = vocab_parallel_logprobs(logits_BTV, target_BT, ctx.tp_group, ctx.temperature, ctx.vocab_size)
    zero = torch.zeros((), dtype=torch.int)
    if ctx.loss_fn is None:
        return logp_BT.sum() * 0.0, zero, {"logp": logp_BT.detach()}
    batch = LossBatch(
        logp_BT=logp_BT, mask_BT=mb.mask_BT.to(logp_BT.dtype), advantages_B=mb.advantages_B, rewards_B=mb.rewards_B,
        group_index_B=mb.group_index_B, num_groups=mb.num_prompts, old_logp_BT=mb.old_logp_BT,
        ref_logp_BT=mb.ref_logp_BT,
    )
    loss, metrics = ctx.loss_fn(batch, ctx.norm, dp_group=ctx.dp_group)
    with torch.no_grad():
        if ctx.entropy:
            entropy_BT = vocab_parallel_entropy(logits_BTV.detach(), ctx.tp_group, ctx.temperature, ctx.vocab_size)
            metrics["entropy"] = (entropy_BT * batch.mask_BT).sum() / batch.mask_BT.sum().clamp(min=1)
        metrics["loss"] = loss.detach()  # this micro-batch's share: summed, not averaged, below
    return loss, zero, metrics


def _forward_step(ctx: StepContext, data_iterator, model):
    mb: RolloutBatch = next(data_iterator)
    S = mb.tokens_BS.shape[1]
    position_ids = torch.arange(S, device=mb.tokens_BS.device)[None].expand(mb.tokens_BS.shape[0], -1)
    output = model(mb.tokens_BS, position_ids, _causal_mask(S, mb.tokens_BS.device))
    return output, partial(_loss_func, mb, ctx)


def run_schedule(chunks, mbs: list[RolloutBatch], ctx: StepContext, forward_only: bool) -> list[dict]:
    """megatron-core's schedule over `mbs`; returns the loss function's dicts (last stage only)."""
    iterators = [iter(mbs) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, ctx),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(mbs),
        seq_length=mbs[0].tokens_BS.shape[1],
        micro_batch_size=mbs[0].tokens_BS.shape[0],
        forward_only=forward_only,
    )


def _context(loss_fn, norm, temperature: float, vocab_size: int, entropy: bool = True) -> StepContext:
    return StepContext(loss_fn, norm, temperature, vocab_size, parallel_state.get_tensor_model_parallel_group(),
                       parallel_state.get_data_parallel_group(), entropy)


@torch.no_grad()
def compute_logprobs(chunks, batch: RolloutBatch, micro_batch_size: int, temperature: float,
                     vocab_size: int) -> torch.Tensor | None:
    """Forward-only log-probs of tokens_BS[:, 1:] (B x T) on the last pipeline stage; None elsewhere."""
    for chunk in chunks:
        chunk.eval()
    outs = run_schedule(chunks, micro_batches(batch, micro_batch_size),
                        _context(None, None, temperature, vocab_size), forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logp"] for o in outs])


def _reduce_metrics(per_micro_batch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum the loss shares, average the rest over micro-batches and DP (NaNs left out; a metric with
    no value anywhere is dropped); every rank gets the result. One host sync for all of them."""
    keys = sorted(per_micro_batch[0]) if per_micro_batch else []
    nan = torch.tensor(float("nan"))
    values = torch.stack([torch.stack([mb.get(k, nan).detach().double().cpu() for k in keys])
                          for mb in per_micro_batch]) if keys else torch.zeros(0, 0, dtype=torch.float64)
    summed = values.nansum(0) if len(keys) else values
    counts = (~values.isnan()).sum(0).double() if len(keys) else values
    dp = parallel_state.get_data_parallel_group()
    dist.all_reduce(summed, group=dp)
    dist.all_reduce(counts, group=dp)
    # loss: shares of the global loss, summed over micro-batches and DP (NaN if any share is: the step
    # is skipped as non-finite); the rest are averages of their finite values.
    result = {k: float(summed[i] / counts[i]) for i, k in enumerate(keys) if counts[i] and k != "loss"}
    if "loss" in keys:
        i = keys.index("loss")
        result["loss"] = float(summed[i]) if counts[i] == values.shape[0] * dist.get_world_size(dp) else float("nan")
    # Only the last stage has them: broadcast along the pipeline.
    return _broadcast_metrics(result, parallel_state.get_pipeline_model_parallel_last_rank(),
                              parallel_state.get_pipeline_model_parallel_group())


def _broadcast_metrics(metrics: dict[str, float], src: int, group) -> dict[str, float]:
    """A name -> float dict from global rank `src` to the group, as tensors (names as bytes; no pickling)."""
    if dist.get_world_size(group) == 1:
        return metrics
    mine = dist.get_rank() == src
    names = torch.tensor(list("\n".join(metrics).encode()) if mine else [], dtype=torch.uint8)
    sizes = torch.tensor([names.numel(), len(metrics)] if mine else [0, 0], dtype=torch.int64)
    dist.broadcast(sizes, src, group=group)
    names = names if mine else torch.empty(int(sizes[0]), dtype=torch.uint8)
    values = torch.tensor(list(metrics.values()) if mine else [0.0] * int(sizes[1]), dtype=torch.float64)
    dist.broadcast(names, src, group=group)
    dist.broadcast(values, src, group=group)
    keys = bytes(names.tolist()).decode().split("\n") if int(sizes[1]) else []
    return dict(zip(keys, values.tolist()))


def train_mini_batch(policy, loss_fn, batch: RolloutBatch, *, micro_batch_size: int, temperature: float,
                     vocab_size: int, entropy: bool = True) -> dict[str, float]:
    """One optimizer step on one mini-batch; returns metrics reduced over micro-batches and ranks."""
    for chunk in policy.chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    norm = global_norm(batch.mask_BT, batch.mask_BT.shape[1], parallel_state.get_data_parallel_group())
    outs = run_schedule(policy.chunks, micro_batches(batch, micro_batch_size),
                        _context(loss_fn, norm, temperature, vocab_size, entropy), forward_only=False)
    lr = policy.optimizer.param_groups[0]["lr"]  # the rate this step uses
    nonfinite = _nonfinite_anywhere(policy.chunks, outs)
    success, grad_norm = False, None
    if not nonfinite:  # megatron skips only under fp16 loss scaling: bf16/fp32 would apply NaN updates
        success, grad_norm, _ = policy.optimizer.step()
    if success:
        policy.scheduler.step(increment=1)
    metrics = _reduce_metrics(outs if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else [])
    metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   update_skipped=float(not success), nonfinite=float(nonfinite), lr=lr)
    return metrics


def _nonfinite_anywhere(chunks, outs: list[dict]) -> bool:
    """Whether any rank saw a non-finite loss or gradient: one flag, all-reduced over every rank, so
    all skip the update together. Reads the DDP gradient buffers once (contiguous)."""
    losses = [mb["loss"] for mb in outs if "loss" in mb]
    bad, device = bool(losses) and not bool(torch.isfinite(torch.stack(losses)).all()), torch.device("cpu")
    for chunk in chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            device = buffer.grad_data.device  # the process group's device (gloo: CPU, NCCL: GPU)
            bad = bad or not bool(torch.isfinite(buffer.grad_data).all())
    flag = torch.tensor([float(bad)], device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_rollout_batch(policy, loss_fn, batch: RolloutBatch, *, num_mini_batches: int, micro_batch_size: int,
                        temperature: float, vocab_size: int, entropy: bool = True) -> list[dict[str, float]]:
    """Several optimizer steps on one rollout batch: contiguous prompt ranges, one step each."""
    B = batch.tokens_BS.shape[0]
    assert B % num_mini_batches == 0 and (B // num_mini_batches) % batch.samples_per_prompt == 0
    size = B // num_mini_batches
    return [train_mini_batch(policy, loss_fn, batch.select(slice(i, i + size)), micro_batch_size=micro_batch_size,
                             temperature=temperature, vocab_size=vocab_size, entropy=entropy)
            for i in range(0, B, size)]
