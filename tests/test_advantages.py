"""Explicit advantages and DAPO's reward-side pieces: hand-computed cases and the loop reference."""

import math

import pytest
import torch

from gift_megatron.algo import GroupFilter, group_advantages, overlong_penalty
from gift_megatron.algo.advantages import informative_groups
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
    # Round 1: groups a (mixed), b (all 1), c (mixed) -> 2 kept, b set aside.
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert informative_groups(r, torch.tensor([0, 0, 1, 1, 2, 2]), 3).tolist() == [True, False, True]
    filt.add(["a", "b", "c"], r)
    assert not filt.full and filt.kept == ["a", "c"] and filt.dropped == ["b"]
    assert filt.frac_informative == pytest.approx(2 / 3)
    # Round 2: d (all 0), e (mixed), f (mixed): full; the batch is the first 3 kept, in arrival order.
    filt.add(["d", "e", "f"], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
    assert filt.full and filt.rounds == 2 and filt.frac_informative == 1.0
    assert filt.take() == ["a", "c", "e"]


def test_dynamic_sampling_tops_up_with_set_aside_groups_when_rounds_run_out():
    filt = GroupFilter(num_groups_wanted=3)
    filt.add(["a", "b", "c"], torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]))  # only b is informative
    assert not filt.full
    assert filt.take() == ["b", "a", "c"]  # kept first, then the set-aside ones in arrival order
    assert filt.frac_informative == pytest.approx(1 / 3)
