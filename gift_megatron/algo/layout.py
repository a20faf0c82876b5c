"""docs/design.md's batch layout, as pure index arithmetic.

A step has P prompts x G samples, ordered prompt-major (sample j of prompt p at p * G + j). Each of
the DP ranks holds G/DP samples of EVERY prompt; a mini-batch is a contiguous range of prompts; a
micro-batch holds whole groups (the same prompts on every DP rank), so per-prompt statistics need
only an all-reduce over DP within the micro-batch. Token-budget micro-batches (`token_budget_bins`)
cut groups instead: the statistics are then taken over the whole mini-batch first
(algo/losses.py `gift_group_statistics`).
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



def sequence_lengths(mask_BS: torch.Tensor) -> torch.Tensor:
    """Positions each row needs: through its last masked (response/answer) token; 2 at least (one
    predicted position)."""
    positions = torch.arange(1, mask_BS.shape[1] + 1, device=mask_BS.device)
    return (mask_BS * positions).amax(-1).long().clamp(min=2)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def token_budget_bins(lengths: list[int], max_tokens: int, pad_multiple: int = 1,
                      max_padding: float = 0.1) -> list[list[int]]:
    """Token-budget micro-batches: sample indices sorted longest first, cut greedily into bins whose
    padded size (samples x the bin's longest length, rounded up to `pad_multiple`) stays within
    `max_tokens`, and whose samples are at least (1 - max_padding) of the bin's longest: each bin,
    padded only to its own longest sample, is at most that fraction padding (plus the rounding).
    Without the second rule a bin of short samples spans a wide range of lengths (measured on a
    long-tailed distribution: 19% padding, against 4% with it). Longest bins first (an
    out-of-memory shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        if round_up(lengths[i], pad_multiple) > max_tokens:
            raise ValueError(f"a sequence of {lengths[i]} tokens exceeds parallel.max_tokens_per_micro_batch="
                             f"{max_tokens}: raise it to at least data.max_prompt_length + rollout.max_new_tokens")
        # The bin's first sample is its longest (sorted): adding one more costs that length again.
        longest = round_up(lengths[bins[-1][0]], pad_multiple) if bins else 0
        if bins and (len(bins[-1]) + 1) * longest <= max_tokens and lengths[i] >= (1 - max_padding) * longest:
            bins[-1].append(i)
        else:
            bins.append([i])
    return bins


def split_bins(bins: list[list[int]], count: int) -> list[list[int]]:
    """`bins` cut into `count` bins (every DP rank must run the same number of micro-batches): the
    bin with the most samples is halved until there are enough. Needs count <= number of samples."""
    bins = [list(b) for b in bins]
    assert count <= sum(map(len, bins)), (count, bins)
    while len(bins) < count:
        i = max(range(len(bins)), key=lambda j: len(bins[j]))
        half = len(bins[i]) // 2
        bins[i: i + 1] = [bins[i][:half], bins[i][half:]]
    return bins


def packed_rows(lengths: list[int], max_tokens: int, pad_multiple: int = 1) -> list[list[int]]:
    """Sequence packing: sample indices in rows of at most `max_tokens` tokens (their lengths summed,
    the row rounded up to `pad_multiple`), first-fit decreasing; each row's samples longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    totals: list[int] = []
    for i in order:
        if round_up(lengths[i], pad_multiple) > max_tokens:
            raise ValueError(f"a sequence of {lengths[i]} tokens exceeds parallel.max_tokens_per_micro_batch="
                             f"{max_tokens}: raise it to at least data.max_prompt_length + rollout.max_new_tokens")
        fits = [r for r, total in enumerate(totals) if round_up(total + lengths[i], pad_multiple) <= max_tokens]
        if fits:
            rows[fits[0]].append(i)
            totals[fits[0]] += lengths[i]
        else:
            rows.append([i])
            totals.append(lengths[i])
    return rows
