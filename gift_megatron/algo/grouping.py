"""Per-prompt (group) statistics over samples that may sit on several data-parallel ranks.

Legend of shape suffixes: B = samples held by this rank, P = groups (prompts) in the batch.

`group_index_B` maps each local sample to its prompt in [0, P). docs/design.md's batch layout puts
the same P prompts on every DP rank (each rank holds G/DP samples of each), so summing per-group
partial sums over the DP group gives the statistics of the WHOLE group, exactly as if one process
held it. Statistics are computed in float64 with a two-pass (mean, then centred squares) scheme:
two tiny all-reduces of P numbers each, no catastrophic cancellation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def _world(process_group: dist.ProcessGroup | None) -> int:
    if process_group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def all_reduce_sum(x: torch.Tensor, process_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over the ranks of `process_group`; differentiable when `x` requires grad.

    The backward of a sum-all-reduce is a sum-all-reduce of the incoming gradients: every rank's
    loss depends on the reduced value, so each input's gradient collects all ranks' contributions.
    """
    if _world(process_group) == 1:
        return x
    if x.requires_grad:
        return dist_fn.all_reduce(x, op=dist.ReduceOp.SUM, group=process_group)
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=process_group)
    return x


def group_sum(
    x_B: torch.Tensor,
    group_index_B: torch.Tensor,
    num_groups: int,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-group sum over all ranks of `process_group`: returns x_P (float64)."""
    local_P = torch.zeros(num_groups, dtype=torch.float64, device=x_B.device)
    local_P = local_P.index_add(0, group_index_B, x_B.to(torch.float64))
    return all_reduce_sum(local_P, process_group)


@dataclass
class GroupStats:
    """Whole-group statistics, one entry per prompt (float64)."""

    count_P: torch.Tensor
    mean_P: torch.Tensor
    std_P: torch.Tensor  # Bessel-corrected; 0 for singleton groups


def group_stats(
    x_B: torch.Tensor,
    group_index_B: torch.Tensor,
    num_groups: int,
    process_group: dist.ProcessGroup | None = None,
) -> GroupStats:
    """Count, mean and Bessel std of x per group, over every rank of `process_group`.

    Differentiable in x_B when it requires grad (mean and std carry gradient to every member,
    on every rank). A singleton group has std 0 (its only member equals the mean).
    """
    ones_B = torch.ones_like(x_B, dtype=torch.float64)
    count_P = group_sum(ones_B, group_index_B, num_groups, process_group)
    assert bool((count_P > 0).all()), "every group needs at least one sample on some rank"
    mean_P = group_sum(x_B, group_index_B, num_groups, process_group) / count_P
    centred_B = x_B.to(torch.float64) - mean_P[group_index_B]
    sq_P = group_sum(centred_B.square(), group_index_B, num_groups, process_group)
    var_P = sq_P / (count_P - 1).clamp(min=1)
    # sqrt'(0) is infinite: route exact zeros through a constant so gradients stay finite.
    positive_P = var_P > 0
    std_P = torch.where(positive_P, var_P.clamp(min=1e-300).sqrt(), torch.zeros_like(var_P))
    return GroupStats(count_P=count_P, mean_P=mean_P, std_P=std_P)


def group_zscore(
    x_B: torch.Tensor,
    group_index_B: torch.Tensor,
    num_groups: int,
    *,
    eps: float,
    std_floor: float = 0.0,
    detach_stats: bool = True,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, GroupStats]:
    """(x - mean_g) / (max(std_g, std_floor) + eps), per group over all ranks; float64.

    With `detach_stats` the mean and std are constants for autograd (gradient only through x).
    """
    stats = group_stats(x_B.detach() if detach_stats else x_B, group_index_B, num_groups, process_group)
    return zscore_with(x_B, stats, group_index_B, eps=eps, std_floor=std_floor), stats


def zscore_with(x_B: torch.Tensor, stats: GroupStats, group_index_B: torch.Tensor, *, eps: float,
                std_floor: float = 0.0) -> torch.Tensor:
    """(x - mean_g) / (max(std_g, std_floor) + eps) with given group statistics; float64."""
    denom_P = stats.std_P.clamp(min=std_floor) + eps
    return (x_B.to(torch.float64) - stats.mean_P[group_index_B]) / denom_P[group_index_B]
