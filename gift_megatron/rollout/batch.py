"""Completions -> the padded step batch the trainer consumes (prompt-major, right-padded).

Legend: B = P x G samples, S = longest prompt + completion, T = S - 1 predicted positions.
Sample j of prompt i is row i * G + j. Token t of a sequence is predicted at position t - 1, so a
completion of n tokens after a prompt of p tokens occupies tokens_BS[:, p : p + n], response_mask_BS
there, and engine_logp_BT[:, p - 1 : p - 1 + n].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gift_megatron.rollout.engine import Completion


@dataclass
class StepBatch:
    tokens_BS: torch.Tensor
    response_mask_BS: torch.Tensor
    engine_logp_BT: torch.Tensor  # the engine's log-probs of the sampled tokens (0 elsewhere)
    group_index_B: torch.Tensor
    response_lengths_B: torch.Tensor
    finished_B: torch.Tensor  # True where the completion stopped (EOS / stop token) before the limit


def build_step_batch(prompts: list[list[int]], groups: list[list[Completion]], pad_id: int) -> StepBatch:
    seqs = [(p, c) for p, group in zip(prompts, groups) for c in group]
    S = max(len(p) + len(c.token_ids) for p, c in seqs)
    B = len(seqs)
    tokens = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S)
    logp = torch.zeros(B, S - 1)
    for i, (p, c) in enumerate(seqs):
        n = len(c.token_ids)
        tokens[i, : len(p)] = torch.tensor(p)
        if n:
            tokens[i, len(p): len(p) + n] = torch.tensor(c.token_ids)
            mask[i, len(p): len(p) + n] = 1.0
            logp[i, len(p) - 1: len(p) - 1 + n] = torch.tensor(c.logprobs)
    group_index = torch.arange(len(groups)).repeat_interleave(torch.tensor([len(g) for g in groups]))
    lengths = torch.tensor([len(c.token_ids) for _, c in seqs])
    finished = torch.tensor([c.finish_reason == "stop" for _, c in seqs])
    return StepBatch(tokens, mask, logp, group_index, lengths, finished)
