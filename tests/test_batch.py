"""Completions -> padded step batch: positions of tokens, masks and log-probs by hand."""

import torch

from gift_megatron.rollout.batch import build_step_batch
from gift_megatron.rollout.engine import Completion


def test_build_step_batch_by_hand():
    prompts = [[10, 11], [12]]
    groups = [[Completion([5, 3], [-0.5, -0.1], "stop"), Completion([6], [-1.0], "length")],
              [Completion([7, 8, 3], [-0.2, -0.3, -0.4], "stop"), Completion([], [], "length")]]
    b = build_step_batch(prompts, groups, pad_id=0)
    assert b.tokens_BS.tolist() == [[10, 11, 5, 3], [10, 11, 6, 0], [12, 7, 8, 3], [12, 0, 0, 0]]
    assert b.response_mask_BS.tolist() == [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]]
    # logp at t - 1 for the token at t: the same positions as response_mask_BS[:, 1:]
    want = torch.tensor([[0, -0.5, -0.1], [0, -1.0, 0], [-0.2, -0.3, -0.4], [0, 0, 0]])
    torch.testing.assert_close(b.engine_logp_BT, want)
    assert torch.equal((b.engine_logp_BT != 0).float(), b.response_mask_BS[:, 1:])
    assert b.group_index_B.tolist() == [0, 0, 1, 1]
    assert b.response_lengths_B.tolist() == [2, 1, 3, 0]
    assert b.finished_B.tolist() == [True, False, True, False]
