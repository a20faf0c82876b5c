"""Explicit advantages and DAPO's reward-side pieces: hand-computed cases and the loop reference."""

import math

import pytest
import torch

from gift_megatron.algo import GroupFilter, group_advantages, overlong_penalty
from gift_megatron.algo.advantages import nonconstant_groups
from tests.reference import ref_advantages


def test_group_advantages_hand_computed():
    # Group 0: rewards (1, 0, 0): mean 1/3, Bessel std sqrt(1/3) -> (2/3, -1/3, -1/3) / sqrt(1/3).
    # Group 1: a singleton -> 0. Group 2: equal rewards -> 0.
    r = torch.tensor([1.0, 0.0, 0.0, 0.7, 0.5, 0.5])
    gi = torch.tensor([0, 0, 0, 1, 2, 2])
    adv = group_advantages(r, gi, 3)
    sd = math.sqrt(1 / 3)
    expected = torch.tensor([2 / 3 / sd, -1 / 3 / sd, -1 / 3 / sd, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)
    assert adv[3:].eq(0).all()  # exactly 0, not eps-sized
    dr = group_advantages(r, gi, 3, estimator="drgrpo")
    torch.testing.assert_close(dr, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo"])
def test_group_advantages_match_loop_reference(estimator):
    g = torch.Generator().manual_seed(0)
    r = torch.rand(40, generator=g)
    gi = torch.randint(0, 7, (40,), generator=g)
    gi[:7] = torch.arange(7)  # every group present
    expected = torch.stack(ref_advantages(r, gi, estimator=estimator)).float()
    torch.testing.assert_close(group_advantages(r, gi, 7, estimator=estimator), expected, rtol=1e-5, atol=1e-6)


def test_unknown_estimator_is_named():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), 1, estimator="ppo")


def test_overlong_penalty_dapo_formula():
    # Lmax 20, buffer 4: no penalty up to 16, linear to -1 at 20, -1 beyond.
    lengths = torch.tensor([3, 16, 17, 18, 20, 25])
    got = overlong_penalty(lengths, max_response_length=20, buffer_length=4, penalty_factor=1.0)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    got = overlong_penalty(lengths, 20, 4, penalty_factor=0.5)
    assert got.min().item() == -0.5


def test_dynamic_sampling_keeps_informative_groups_and_refills():
    filt = GroupFilter(num_groups_wanted=3)
    # Round 1: groups 0 (mixed), 1 (all 1), 2 (mixed) -> 2 kept.
    gi = torch.tensor([0, 0, 1, 1, 2, 2])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert nonconstant_groups(r, gi, 3).tolist() == [True, False, True]
    filt.add(gi, 3, r, ids=torch.arange(6))
    assert not filt.full and filt.num_groups_kept == 2 and filt.num_groups_dropped == 1
    # Round 2: groups 0 (all 0), 1 (mixed), 2 (mixed): the batch is full after the first of them.
    filt.add(gi, 3, torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0]), ids=torch.arange(6, 12))
    assert filt.full
    batch = filt.take()
    assert batch["ids"].tolist() == [0, 1, 4, 5, 8, 9]
    assert batch["group_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["rewards"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
