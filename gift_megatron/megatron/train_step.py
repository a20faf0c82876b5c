"""The train step: megatron-core schedules over micro-batches, vocab-parallel log-probs, algo losses.

Legend: B = samples on this DP rank, S = sequence positions, T = S - 1 predicted positions.

A `RolloutBatch` (gift_megatron/batch.py) is this DP rank's share of one mini-batch, prompt-major (G/DP samples of each
prompt in turn). Micro-batches (`MicroBatching`) are either contiguous slices of `micro_batch_size`
samples, whole groups, the same prompts on every DP rank (docs/design.md), all padded to the batch's
longest sequence; or, with a token budget, this rank's samples sorted by length and packed into bins
of at most `max_tokens` padded tokens, each padded only to its own longest sample, as many bins on
every DP rank (megatron's schedules run the same number of micro-batches everywhere). Bins cut
groups: losses that need whole-group statistics (GIFT's z) get them over the whole mini-batch first
(`algo.build_group_statistics`), so the loss and gradient equal the fixed-batch ones.

`train_mini_batch(policy, loss, batch, ...)` is one optimizer step with the algorithm's loss (GIFT:
algo/losses.py gift_loss), handed over by the caller: `run_schedule` runs megatron-core's schedule,
whose forward step runs the model chunk and, on the last pipeline stage, `_loss_func` turns the
vocab-sharded logits into log-probs and calls `loss` with the DP group. Pipelining
(none, 1F1B, interleaved) is megatron-core's `get_forward_backward_func`, chosen from the parallel
state; varying micro-batch shapes need its `variable_seq_lengths` (set by megatron/model.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from gift_megatron.algo import LossBatch, LossNorm, global_norm, vocab_parallel_entropy, vocab_parallel_logprobs
from gift_megatron.algo.layout import packed_rows, round_up, split_bins, token_budget_bins
from gift_megatron.algo.losses import GroupStatisticsFn, LossFn, WholeGroups
from gift_megatron.batch import RolloutBatch
from gift_megatron.megatron.policy import Policy


def _causal_mask(seq_len: int, device) -> torch.Tensor:
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


@dataclass(frozen=True)
class MicroBatching:
    """How a rank's samples become micro-batches: `size` samples each (whole groups, one shape), or with
    `max_tokens` > 0 token-budget bins (`size` unused); lengths rounded up to `pad_multiple` (TP under
    sequence parallelism)."""

    size: int
    max_tokens: int = 0
    pad_multiple: int = 1
    pack: bool = False  # with max_tokens: several sequences per row (see PackedRow)


@dataclass(frozen=True)
class StageLogprobs:
    """Log-probs of a forward pass over a batch: every pipeline stage takes part, the last holds them
    (`logp_BT`, B x T), the others None. Whether a caller has one is the same on every rank."""

    logp_BT: torch.Tensor | None

    def rows(self, idx: slice) -> StageLogprobs:
        return StageLogprobs(self.logp_BT[idx] if self.logp_BT is not None else None)


@dataclass
class PackedRow:
    """A micro-batch's sequences concatenated in one row (sequence packing, the local attention spec):
    attention is causal within each sequence only (a block-diagonal mask), so each sequence's logits
    are its own; RoPE sees positions offset by the sequences before it, which leaves attention (a
    function of relative positions) unchanged. `index_BT` picks, for each sample and position, the row
    position whose logits predict that token (positions past a sample's end repeat its last)."""

    tokens_1R: torch.Tensor
    segment_R: torch.Tensor  # which sample each row position belongs to (-1: padding at the end)
    index_BT: torch.Tensor

    @classmethod
    def of(cls, mb: RolloutBatch, lengths: list[int], row_length: int) -> PackedRow:
        tokens = torch.zeros(1, row_length, dtype=mb.tokens_BS.dtype)
        segment = torch.full((row_length,), -1)
        index = torch.zeros(len(lengths), mb.tokens_BS.shape[1] - 1, dtype=torch.long)
        start = 0
        for i, n in enumerate(lengths):
            tokens[0, start: start + n] = mb.tokens_BS[i, :n]
            segment[start: start + n] = i
            index[i] = start + torch.arange(index.shape[1]).clamp(max=n - 2)
            start += n
        device = mb.tokens_BS.device
        return cls(tokens.to(device), segment.to(device), index.to(device))

    def attention_mask(self) -> torch.Tensor:
        """True where attention is masked: across sequences, and the future."""
        R = self.segment_R.shape[0]
        other = self.segment_R[:, None] != self.segment_R[None, :]
        return (other | _causal_mask(R, self.segment_R.device)[0, 0])[None, None]


@dataclass
class MicroBatches:
    """A batch cut into micro-batches: `rows[i]` are the batch rows of `parts[i]` (with `packed[i]` when
    its sequences share one row); `computed` the positions the passes run over (padding included),
    `needed` those the sequences fill."""

    parts: list[RolloutBatch]
    rows: list[torch.Tensor]
    computed: int
    needed: int
    packed: Sequence[PackedRow | None]


def micro_batches(batch: RolloutBatch, batching: MicroBatching) -> MicroBatches:
    B, S = batch.tokens_BS.shape
    lengths = batch.sequence_lengths().tolist()
    needed = sum(lengths)
    if not batching.max_tokens:
        assert B % batching.size == 0 and batching.size % batch.samples_per_prompt == 0, (B, batching.size)
        rows = [torch.arange(i, i + batching.size) for i in range(0, B, batching.size)]
        return MicroBatches([batch.select(slice(i, i + batching.size)) for i in range(0, B, batching.size)], rows,
                            B * S, needed, [None] * len(rows))
    cut = packed_rows if batching.pack else token_budget_bins
    bins = cut(lengths, batching.max_tokens, batching.pad_multiple)
    most = torch.tensor([len(bins)])
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    count = int(most)
    if parallel_state.get_virtual_pipeline_model_parallel_world_size():  # the interleaved schedule's rule
        count = round_up(count, parallel_state.get_pipeline_model_parallel_world_size())
    if count > B:
        raise ValueError(f"{count} micro-batches needed (a multiple of the pipeline size under interleaving) "
                         f"but this rank holds {B} samples: raise parallel.max_tokens_per_micro_batch")
    bins = split_bins(bins, count)
    indexed = replace(batch, prompt_index_B=batch.group_index_B)  # rows leave prompt-major order
    rows = [torch.tensor(b) for b in bins]
    longest = [lengths[b[0]] for b in bins]  # each bin's first is its longest
    parts = [indexed.select(r).resize(n) for r, n in zip(rows, longest)]
    if not batching.pack:
        sizes = [round_up(n, batching.pad_multiple) for n in longest]  # zero-padded past the longest
        return MicroBatches([p.resize(n) if n != p.tokens_BS.shape[1] else p for p, n in zip(parts, sizes)], rows,
                            sum(len(b) * n for b, n in zip(bins, sizes)), needed, [None] * len(bins))
    sizes = [round_up(sum(lengths[i] for i in b), batching.pad_multiple) for b in bins]
    packed = [PackedRow.of(p, [lengths[i] for i in b], n) for p, b, n in zip(parts, bins, sizes)]
    return MicroBatches(parts, rows, sum(sizes), needed, packed)


@dataclass
class StepContext:
    """What the loss function needs besides the micro-batch."""

    loss_fn: LossFn | None  # the algorithm's loss; None: forward-only log-prob collection
    norm: LossNorm | None
    temperature: float
    vocab_size: int
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    entropy: bool = True  # also the mean token entropy (a full-vocabulary pass over the logits)
    groups: WholeGroups | None = None  # whole-group statistics, when micro-batches cut groups


def _loss_func(mb: RolloutBatch, row: PackedRow | None, ctx: StepContext, logits_BSV: torch.Tensor):
    """Last pipeline stage: vocab-sharded logits -> log-probs -> the algorithm's loss (GIFT:
    algo/losses.py gift_loss). Metrics stay tensors; `_reduce_metrics` reduces them after the schedule.
    A packed row's log-probs (and entropies) are taken over the row, then picked per sample."""
    logits_BTV = logits_BSV[:, :-1]
    target_BT = (row.tokens_1R if row is not None else mb.tokens_BS)[:, 1:]
    per_sample = (lambda x: x[0, row.index_BT]) if row is not None else (lambda x: x)  # noqa: E731
    logp_BT = per_sample(vocab_parallel_logprobs(logits_BTV, target_BT, ctx.tp_group, ctx.temperature,
                                                 ctx.vocab_size))
    zero = torch.zeros((), dtype=torch.int)
    if ctx.loss_fn is None:
        return logp_BT.sum() * 0.0, zero, {"logp": logp_BT.detach()}
    batch = LossBatch(
        logp_BT=logp_BT, mask_BT=mb.mask_BT.to(logp_BT.dtype), advantages_B=mb.advantages_B, rewards_B=mb.rewards_B,
        group_index_B=mb.group_index_B, num_groups=mb.num_prompts, proximal_logp_BT=mb.proximal_logp_BT,
        ref_logp_BT=mb.ref_logp_BT, behaviour_logp_BT=mb.behaviour_logp_BT, groups=ctx.groups,
    )
    assert ctx.norm is not None, "a loss comes with its mini-batch's norm"
    loss, metrics = ctx.loss_fn(batch, ctx.norm, dp_group=ctx.dp_group)
    with torch.no_grad():
        if ctx.entropy:
            entropy_BT = per_sample(vocab_parallel_entropy(logits_BTV.detach(), ctx.tp_group, ctx.temperature,
                                                           ctx.vocab_size))
            metrics["entropy"] = (entropy_BT * batch.mask_BT).sum() / batch.mask_BT.sum().clamp(min=1)
        metrics["loss"] = loss.detach()  # this micro-batch's share: summed, not averaged, below
    return loss, zero, metrics


def _forward_step(ctx: StepContext, data_iterator, model):
    mb, row = next(data_iterator)
    tokens = row.tokens_1R if row is not None else mb.tokens_BS
    B, S = tokens.shape
    position_ids = torch.arange(S, device=tokens.device)[None].expand(B, -1)
    mask = row.attention_mask() if row is not None else _causal_mask(S, tokens.device)
    output = model(tokens, position_ids, mask)
    return output, partial(_loss_func, mb, row, ctx)


def run_schedule(chunks, mbs: MicroBatches, ctx: StepContext, forward_only: bool) -> list[dict]:
    """megatron-core's schedule over `mbs`; returns the loss function's dicts (last stage only)."""
    inputs = [row.tokens_1R if row is not None else mb.tokens_BS for mb, row in zip(mbs.parts, mbs.packed)]
    if (len({t.shape for t in inputs}) > 1 and parallel_state.get_pipeline_model_parallel_world_size() > 1
            and not get_model_config(chunks[0]).variable_seq_lengths):
        raise RuntimeError("micro-batches of different shapes under pipeline parallelism need the model built with "
                           "variable_seq_lengths (parallel.max_tokens_per_micro_batch > 0 sets it)")
    iterators = [iter(list(zip(mbs.parts, mbs.packed))) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, ctx),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(inputs),
        seq_length=inputs[0].shape[1],
        micro_batch_size=inputs[0].shape[0],
        forward_only=forward_only,
    )


def _context(loss_fn, norm, temperature: float, vocab_size: int, entropy: bool = True,
             groups: WholeGroups | None = None) -> StepContext:
    return StepContext(loss_fn, norm, temperature, vocab_size, parallel_state.get_tensor_model_parallel_group(),
                       parallel_state.get_data_parallel_group(), entropy, groups)


@torch.no_grad()
def compute_logprobs(chunks, batch: RolloutBatch, batching: MicroBatching, temperature: float,
                     vocab_size: int) -> torch.Tensor | None:
    """Forward-only log-probs of tokens_BS[:, 1:] (B x T, zero past each micro-batch's length) on the
    last pipeline stage; None elsewhere."""
    for chunk in chunks:
        chunk.eval()
    mbs = micro_batches(batch, batching)
    outs = run_schedule(chunks, mbs, _context(None, None, temperature, vocab_size), forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    B, S = batch.tokens_BS.shape
    logp = torch.zeros(B, S - 1, dtype=outs[0]["logp"].dtype, device=outs[0]["logp"].device)
    for rows, out in zip(mbs.rows, outs):
        T = min(out["logp"].shape[1], S - 1)
        logp[rows.to(logp.device), :T] = out["logp"][:, :T]
    return logp


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


def train_mini_batch(policy: Policy, loss_fn: LossFn, batch: RolloutBatch, *, batching: MicroBatching,
                     temperature: float, vocab_size: int, entropy: bool = True,
                     group_statistics: GroupStatisticsFn | None = None,
                     initial_logp: StageLogprobs | None = None) -> dict[str, float]:
    """One optimizer step on one mini-batch with `loss_fn` (the algorithm's loss: algo.build_loss);
    returns metrics reduced over micro-batches and ranks.

    `group_statistics` (algo.build_group_statistics; GIFT) with token-budget micro-batches: the
    whole-group statistics at the current weights, from `initial_logp` when the caller has the
    policy's log-probs of this batch at these weights, or else from a forward-only pass."""
    dp_group = parallel_state.get_data_parallel_group()
    norm = global_norm(batch.mask_BT, batch.mask_BT.shape[1], dp_group)
    mbs = micro_batches(batch, batching)
    groups = None
    if group_statistics is not None and batching.max_tokens:
        logp_BT = initial_logp.logp_BT if initial_logp is not None else compute_logprobs(
            policy.chunks, batch, batching, temperature, vocab_size)
        groups = _whole_groups(group_statistics, batch, norm, logp_BT)
    for chunk in policy.chunks:
        chunk.train()
        chunk.zero_grad_buffer()
    policy.optimizer.zero_grad()
    outs = run_schedule(policy.chunks, mbs, _context(loss_fn, norm, temperature, vocab_size, entropy, groups),
                        forward_only=False)
    lr = policy.optimizer.param_groups[0]["lr"]  # the rate this step uses
    nonfinite = _nonfinite_anywhere(policy.chunks, outs)
    success, grad_norm = False, None
    if not nonfinite:  # megatron skips only under fp16 loss scaling: bf16/fp32 would apply NaN updates
        success, grad_norm, _ = policy.optimizer.step()
    if success:
        policy.scheduler.step(increment=1)
    metrics = _reduce_metrics(outs if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else [])
    tokens = torch.tensor([mbs.computed, mbs.needed], dtype=torch.float64)
    dist.all_reduce(tokens, group=dp_group)
    metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   update_skipped=float(not success), nonfinite=float(nonfinite), lr=lr,
                   tokens=float(tokens[1]), padding_frac=float(1 - tokens[1] / tokens[0]))
    return metrics


def _whole_groups(group_statistics: GroupStatisticsFn, batch: RolloutBatch, norm: LossNorm,
                  logp_BT: torch.Tensor | None) -> WholeGroups | None:
    """Whole-group statistics of the mini-batch on the last stage (where the loss runs); None elsewhere."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    assert logp_BT is not None, "the last pipeline stage holds the forward pass's log-probs"
    full = LossBatch(logp_BT=logp_BT, mask_BT=batch.mask_BT.to(logp_BT.dtype), advantages_B=batch.advantages_B,
                     rewards_B=batch.rewards_B, group_index_B=batch.group_index_B, num_groups=batch.num_prompts,
                     proximal_logp_BT=batch.proximal_logp_BT, ref_logp_BT=batch.ref_logp_BT)
    return group_statistics(full, norm, dp_group=parallel_state.get_data_parallel_group())


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
