"""DESIGN.md's batch layout, as pure index arithmetic.

A step has P prompts x G samples, ordered prompt-major (sample j of prompt p at p * G + j). Each of
the DP ranks holds G/DP samples of EVERY prompt; a mini-batch is a contiguous range of prompts; a
micro-batch holds whole groups (the same prompts on every DP rank), so per-prompt statistics need
only an all-reduce over DP within the micro-batch.
"""

from __future__ import annotations

import torch


def dp_sample_indices(num_prompts: int, group_size: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Indices (into the prompt-major step batch) of the samples that `dp_rank` holds."""
    assert group_size % dp_size == 0, "G must be divisible by DP (validated in config)"
    per_rank = group_size // dp_size
    prompts = torch.arange(num_prompts).repeat_interleave(per_rank)
    within = torch.arange(per_rank).repeat(num_prompts) + dp_rank * per_rank
    return prompts * group_size + within

