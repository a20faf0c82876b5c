"""Explicit rewards to advantages, DAPO's reward-side tricks. Pure torch.

Legend: B = samples held by this rank, P = groups (prompts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gift_megatron.algo.grouping import group_stats, group_zscore

ADV_EPS = 1e-6
"""The eps in A = (r - mean) / (std + eps) (docs/design.md)."""


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


def informative_groups(rewards_B: torch.Tensor, group_index_B: torch.Tensor, num_groups: int) -> torch.Tensor:
    """True for groups whose rewards are not all equal (bool, shape P): the groups with a learning
    signal (A != 0). Their complement is what `skip_uninformative_groups` and DAPO's dynamic sampling
    leave out. Runs where all rewards of a group are present (the rollout side, before sharding)."""
    stats = group_stats(rewards_B, group_index_B, num_groups)
    return stats.std_P > 0


class GroupFilter:
    """DAPO's dynamic sampling: gather P informative groups over several generation rounds.

    Each `add` takes one round's groups (any per-group items, prompt-major) and their rewards (G per
    group): informative groups are kept in arrival order, the others set aside. The caller generates
    rounds while not `full`, up to its round limit; `take` then returns P groups, the kept ones first,
    topped up with set-aside ones (zero advantage) when the rounds ran out before P were kept.
    """

    def __init__(self, num_groups_wanted: int) -> None:
        self.num_groups_wanted = num_groups_wanted
        self.kept: list = []
        self.dropped: list = []
        self.rounds = 0

    def add(self, groups: list, rewards_B: torch.Tensor) -> None:
        P = len(groups)
        informative_P = informative_groups(rewards_B, torch.arange(P).repeat_interleave(len(rewards_B) // P), P)
        for group, informative in zip(groups, informative_P.tolist()):
            (self.kept if informative else self.dropped).append(group)
        self.rounds += 1

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.num_groups_wanted

    @property
    def frac_informative(self) -> float:
        """Informative share of the batch `take` returns."""
        return min(len(self.kept), self.num_groups_wanted) / self.num_groups_wanted

    def take(self) -> list:
        return (self.kept + self.dropped)[: self.num_groups_wanted]
