"""Completions -> the padded rollout batch: positions of tokens, masks and log-probs by hand."""

import torch

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
    torch.testing.assert_close(b.engine_logp_BT, want)
    assert torch.equal((b.engine_logp_BT != 0).float(), b.mask_BT)
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
    assert s.engine_logp_BT.shape == (3, 2) and s.old_logp_BT is None and s.samples_per_prompt == 2
