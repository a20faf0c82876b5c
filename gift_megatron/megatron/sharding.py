"""Rank 0's rollout batch to every rank, each DP rank's share of it, and the engine/trainer log-prob
check: the trainer's collectives around the train step (docs/design.md's layout)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from gift_megatron.algo.layout import dp_sample_indices
from gift_megatron.batch import RolloutBatch
from gift_megatron.mismatch import mismatch_stats, summarize


def broadcast_rollout(batch: RolloutBatch | None, extra: list[int], group_size: int) -> tuple[RolloutBatch, list[int]]:
    """Rank 0's batch (tensors only, no pickling) and `extra` ints (the sampler's position) to every rank."""
    if dist.get_world_size() == 1:
        return batch, extra
    header = torch.zeros(2 + len(extra), dtype=torch.long)
    if dist.get_rank() == 0:
        header[:] = torch.tensor([*batch.tokens_BS.shape, *extra])
    dist.broadcast(header, 0)
    B, S, *extra = header.tolist()
    if dist.get_rank() != 0:
        batch = RolloutBatch(torch.empty(B, S, dtype=torch.long), torch.empty(B, S), torch.empty(B), torch.empty(B),
                             group_size, behaviour_logp_BT=torch.empty(B, S - 1))
    for t in (batch.tokens_BS, batch.response_mask_BS, batch.rewards_B, batch.advantages_B, batch.behaviour_logp_BT):
        dist.broadcast(t, 0)
    return batch, extra


def dp_shard(batch: RolloutBatch) -> RolloutBatch:
    """This DP rank's G/DP samples of every prompt: whole prompts stay on every rank, so the group
    statistics (A's and GIFT's z) are all-reduced over DP, never approximated."""
    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return batch
    G = batch.samples_per_prompt
    idx = dp_sample_indices(batch.num_prompts, G, ps.get_data_parallel_rank(), dp)
    return replace(batch.select(idx), samples_per_prompt=G // dp)


def logprob_mismatch(batch: RolloutBatch, trainer_logp_BT: torch.Tensor | None) -> dict[str, float]:
    """Engine vs trainer log-probs over every rank's samples (the last stage has them; TP ranks agree)."""
    stats = torch.zeros(3, dtype=torch.float64)
    if trainer_logp_BT is not None and ps.get_tensor_model_parallel_rank() == 0:
        stats = mismatch_stats(batch.behaviour_logp_BT, trainer_logp_BT, batch.mask_BT)
    if dist.get_world_size() > 1:
        peak = stats[2:].clone()
        dist.all_reduce(stats)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats[2] = peak[0]
    return summarize(stats)
