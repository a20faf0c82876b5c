"""Explicit rewards to advantages, DAPO's reward-side tricks. Pure torch.

Legend: B = samples held by this rank, P = groups (prompts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gift_megatron.algo.grouping import group_stats, group_zscore

ADV_EPS = 1e-6
"""The eps in A = (r - mean) / (std + eps) (DESIGN.md)."""


def group_advantages(
    rewards_B: torch.Tensor,
    group_index_B: torch.Tensor,
    num_groups: int,
    *,
    estimator: str = "grpo",
    eps: float = ADV_EPS,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Group-relative advantages of explicit rewards, statistics over the whole group.

    `grpo`: (r - mean_g r) / (std_g r + eps), Bessel std; `drgrpo` (Dr. GRPO): r - mean_g r.
    A singleton group or a group of equal rewards gets advantage exactly 0. Returns float32.
    """
    if estimator == "grpo":
        adv_B, _ = group_zscore(rewards_B, group_index_B, num_groups, eps=eps, process_group=process_group)
    elif estimator == "drgrpo":
        stats = group_stats(rewards_B, group_index_B, num_groups, process_group)
        adv_B = rewards_B.to(torch.float64) - stats.mean_P[group_index_B]
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}: use 'grpo' or 'drgrpo'")
    return adv_B.float()


def overlong_penalty(
    lengths_B: torch.Tensor, max_response_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the task reward.

    0 for L <= Lmax - Lcache; linear from 0 to -factor over the last Lcache tokens; -factor beyond
    Lmax (DAPO eq. 13, as in verl's `overlong_buffer`).
    """
    expected = max_response_length - buffer_length
    exceed = lengths_B.to(torch.float32) - expected
    return (-exceed / buffer_length * penalty_factor).clamp(min=-penalty_factor, max=0.0)


def nonconstant_groups(rewards_B: torch.Tensor, group_index_B: torch.Tensor, num_groups: int) -> torch.Tensor:
    """DAPO dynamic sampling: True for groups whose rewards are not all equal (bool, shape P).

    Runs where all rewards of a group are present (the rollout side, before data is sharded).
    """
    stats = group_stats(rewards_B, group_index_B, num_groups)
    return stats.std_P > 0


class GroupFilter:
    """Accumulate the groups that DAPO's dynamic sampling keeps until a batch of P is full.

    Each `add` takes a generated batch (any per-sample tensors, aligned with `group_index_B`) and
    keeps its non-constant groups; `full` says whether P groups were gathered; `take` returns the
    first P groups re-indexed 0..P-1. The caller regenerates while not full, up to its round limit.
    """

    def __init__(self, num_groups_wanted: int) -> None:
        self.num_groups_wanted = num_groups_wanted
        self._kept: list[dict[str, torch.Tensor]] = []
        self.num_groups_kept = 0
        self.num_groups_dropped = 0

    def add(self, group_index_B: torch.Tensor, num_groups: int, rewards_B: torch.Tensor, **fields: torch.Tensor):
        keep_P = nonconstant_groups(rewards_B, group_index_B, num_groups)
        new_index_P = torch.cumsum(keep_P.long(), 0) - 1 + self.num_groups_kept
        keep_B = keep_P[group_index_B]
        batch = {k: v[keep_B] for k, v in fields.items()}
        batch["rewards"] = rewards_B[keep_B]
        batch["group_index"] = new_index_P[group_index_B][keep_B]
        self._kept.append(batch)
        self.num_groups_kept += int(keep_P.sum())
        self.num_groups_dropped += int((~keep_P).sum())

    @property
    def full(self) -> bool:
        return self.num_groups_kept >= self.num_groups_wanted

    def take(self) -> dict[str, torch.Tensor]:
        merged = {k: torch.cat([b[k] for b in self._kept]) for k in self._kept[0]} if self._kept else {}
        if not merged:
            return merged
        within = merged["group_index"] < self.num_groups_wanted
        return {k: v[within] for k, v in merged.items()}
