"""Completions -> the padded rollout batch: positions of tokens, masks and log-probs by hand."""

import pytest
import torch

from gift_megatron.algo.layout import packed_rows, split_bins, token_budget_bins
from gift_megatron.rollout.batch import finished, pad_groups, response_lengths
from gift_megatron.rollout.engine import Completion


def test_pad_groups_by_hand():
    prompts = [[10, 11], [12]]
    groups = [[Completion([5, 3], [-0.5, -0.1], "stop"), Completion([6], [-1.0], "length")],
              [Completion([7, 8, 3], [-0.2, -0.3, -0.4], "stop"), Completion([], [], "length")]]
    b = pad_groups(prompts, groups, pad_id=0)
    assert b.tokens_BS.tolist() == [[10, 11, 5, 3], [10, 11, 6, 0], [12, 7, 8, 3], [12, 0, 0, 0]]
    assert b.response_mask_BS.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]]
    # logp at t - 1 for the token at t: the same positions as response_mask_BS[:, 1:]
    want = torch.tensor([[0, -0.5, -0.1], [0, -1.0, 0], [-0.2, -0.3, -0.4], [0, 0, 0]])
    torch.testing.assert_close(b.behaviour_logp_BT, want)
    assert torch.equal((b.behaviour_logp_BT != 0).float(), b.mask_BT)
    assert b.samples_per_prompt == 2 and b.num_prompts == 2
    assert b.group_index_B.tolist() == [0, 0, 1, 1]
    assert response_lengths(groups).tolist() == [2, 1, 3, 0]
    assert finished(groups).tolist() == [True, False, True, False]


def test_select_takes_the_rows_of_every_per_sample_tensor():
    prompts = [[10], [11], [12]]
    groups = [[Completion([i, 3], [-0.5, -0.1], "stop") for i in range(2)] for _ in prompts]
    b = pad_groups(prompts, groups, pad_id=0)
    b.rewards_B, b.advantages_B = torch.arange(6.0), -torch.arange(6.0)
    b.ref_logp_BT = torch.arange(6.0)[:, None].expand(6, 2)
    s = b.select(torch.tensor([1, 3, 5]))
    assert s.tokens_BS[:, 0].tolist() == [10, 11, 12] and s.rewards_B.tolist() == [1.0, 3.0, 5.0]
    assert s.advantages_B.tolist() == [-1.0, -3.0, -5.0] and s.ref_logp_BT[:, 0].tolist() == [1.0, 3.0, 5.0]
    assert s.behaviour_logp_BT.shape == (3, 2) and s.proximal_logp_BT is None and s.samples_per_prompt == 2


def test_token_budget_bins_by_hand():
    """Longest first; a bin grows while (samples + 1) x its longest fits the budget and the sample is at
    least (1 - max_padding) of the longest."""
    lengths = [3, 9, 4, 8, 2, 5]
    budget_only = dict(max_padding=1.0)
    assert token_budget_bins(lengths, 18, **budget_only) == [[1, 3], [5, 2, 0], [4]]  # 2 x 9; 3 x 5 (4 x 5 > 18)
    assert token_budget_bins(lengths, 18, pad_multiple=4, **budget_only) == [[1], [3, 5], [2, 0, 4]]  # 12; 2x8; 3x4
    assert token_budget_bins(lengths, 100, **budget_only) == [[1, 3, 5, 2, 0, 4]]
    lengths = [10, 20, 19, 9, 18, 5]  # default max_padding 0.1: 20, 19, 18 (3 x 20 = 60 fits); 10, 9; 5 < 0.9 x 9
    assert token_budget_bins(lengths, 60) == [[1, 2, 4], [0, 3], [5]]
    assert token_budget_bins(lengths, 59) == [[1, 2], [4], [0, 3], [5]]  # 3 x 20 > 59; 10 < 0.9 x 18
    with pytest.raises(ValueError, match="a sequence of 20 tokens exceeds parallel.max_tokens_per_micro_batch=8"):
        token_budget_bins(lengths, 8)


def test_token_budget_bins_keep_every_sample_once_within_budget():
    g = torch.Generator().manual_seed(0)
    for budget in (64, 100, 257):
        lengths = torch.randint(1, 65, (50,), generator=g).tolist()
        bins = token_budget_bins(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(50))
        for b in bins:
            assert len(b) * max(lengths[i] for i in b) <= budget
            assert min(lengths[i] for i in b) >= 0.9 * max(lengths[i] for i in b)
            assert lengths[b[0]] == max(lengths[i] for i in b)  # the first of a bin is its longest
        for count in (len(bins), len(bins) + 3, 50):  # every DP rank runs as many bins as the fullest
            split = split_bins(bins, count)
            assert len(split) == count and sorted(i for b in split for i in b) == list(range(50))
            assert all(b and lengths[b[0]] == max(lengths[i] for i in b) for b in split)


def test_resize_and_sequence_lengths():
    prompts = [[10, 11], [12]]
    groups = [[Completion([5, 3], [-0.5, -0.1], "stop"), Completion([6], [-1.0], "length")],
              [Completion([7, 8, 3], [-0.2, -0.3, -0.4], "stop"), Completion([], [], "length")]]
    b = pad_groups(prompts, groups, pad_id=0)
    assert b.sequence_lengths().tolist() == [4, 3, 4, 2]  # through the last response token; 2 at least
    short = b.select(torch.tensor([1, 3])).resize(3)
    assert short.tokens_BS.tolist() == [[10, 11, 6], [12, 0, 0]] and short.behaviour_logp_BT.shape == (2, 2)
    longer = b.resize(6)
    assert longer.tokens_BS.shape == (4, 6) and longer.behaviour_logp_BT.shape == (4, 5)
    assert longer.response_mask_BS[:, 4:].sum() == 0
    assert torch.equal(longer.behaviour_logp_BT[:, :3], b.behaviour_logp_BT)


def test_packed_rows_by_hand():
    """First-fit decreasing by summed length: 9+8 | 5+4+3+2 under 18; rows rounded up to the multiple."""
    lengths = [3, 9, 4, 8, 2, 5]
    assert packed_rows(lengths, 18) == [[1, 3], [5, 2, 0, 4]]
    assert packed_rows(lengths, 17) == [[1, 3], [5, 2, 0, 4]]
    assert packed_rows(lengths, 16) == [[1, 5, 4], [3, 2, 0]]  # 9+5+2; 8+4+3
    assert packed_rows(lengths, 16, pad_multiple=5) == [[1, 5], [3, 2, 0], [4]]  # 9+5+2 = 16 -> 20 > 16
    with pytest.raises(ValueError, match="a sequence of 9 tokens exceeds"):
        packed_rows(lengths, 8)


def test_every_tensor_field_declares_its_positions():
    """`resize` trims by POSITIONS, not by name suffixes: a new field that does not say how many positions
    it has is refused at construction (it would otherwise keep the wrong length in every micro-batch)."""
    from dataclasses import dataclass

    from gift_megatron.batch import POSITIONS, RolloutBatch

    @dataclass
    class Wider(RolloutBatch):
        extra_BT: torch.Tensor | None = None

    with pytest.raises(AssertionError, match="extra_BT"):
        Wider(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), None, None, 1)
    b = RolloutBatch(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), torch.zeros(2), torch.zeros(2), 1,
                     ref_logp_BT=torch.zeros(2, 4))
    short = b.resize(3)
    assert [getattr(short, k).shape[1] for k in ("tokens_BS", "response_mask_BS", "ref_logp_BT")] == [3, 3, 2]
    assert short.rewards_B.shape == (2,) and POSITIONS["rewards_B"] is None
