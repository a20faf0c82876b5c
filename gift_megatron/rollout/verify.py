"""Training-inference mismatch: the engine's sampled-token log-probs vs the trainer's recomputation."""

from __future__ import annotations

import torch


def mismatch_stats(engine_logp_BT: torch.Tensor, trainer_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """[sum |engine - trainer|, response tokens, max |engine - trainer|] (float64; sum-reducible, then max)."""
    diff = (engine_logp_BT - trainer_logp_BT).abs() * mask_BT
    return torch.tensor([float(diff.sum()), float(mask_BT.sum()), float(diff.max())], dtype=torch.float64)


def summarize(stats: torch.Tensor) -> dict[str, float]:
    return {"logprob_diff_mean": float(stats[0] / stats[1].clamp(min=1)), "logprob_diff_max": float(stats[2])}


def logprob_mismatch(engine_logp_BT: torch.Tensor, trainer_logp_BT: torch.Tensor,
                     mask_BT: torch.Tensor) -> dict[str, float]:
    """Mean and max |engine - trainer| over response tokens (logged every step)."""
    return summarize(mismatch_stats(engine_logp_BT, trainer_logp_BT, mask_BT))
