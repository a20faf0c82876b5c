"""Completions -> the step batch (gift_megatron/batch.py RolloutBatch). Pure torch.

Legend: B = samples, S = longest prompt + completion, T = S - 1 predicted positions.
Prompt-major: sample j of prompt i is row i * n + j, n = `samples_per_prompt`. Token t of a sequence
is predicted at position t - 1, so a completion of c tokens after a prompt of p tokens occupies
tokens_BS[:, p : p + c], response_mask_BS there, and the log-prob tensors' [:, p - 1 : p - 1 + c].
"""

from __future__ import annotations

import torch

from gift_megatron.batch import RolloutBatch
from gift_megatron.rollout.engine import Completion


def pad_groups(prompts: list[list[int]], groups: list[list[Completion]], pad_id: int) -> RolloutBatch:
    """Prompts and their groups of completions (G each) -> a RolloutBatch without rewards yet."""
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
    return RolloutBatch(tokens, mask, None, None, B // len(groups), behaviour_logp_BT=logp)


def response_lengths(groups: list[list[Completion]]) -> torch.Tensor:
    return torch.tensor([len(c.token_ids) for group in groups for c in group])


def finished(groups: list[list[Completion]]) -> torch.Tensor:
    """True where the completion stopped (EOS / stop token) before the length limit."""
    return torch.tensor([c.finish_reason == "stop" for group in groups for c in group])
