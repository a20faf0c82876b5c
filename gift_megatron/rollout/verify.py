"""Training-inference mismatch: the engine's sampled-token log-probs vs the trainer's recomputation."""

from __future__ import annotations

import torch


def logprob_mismatch(engine_logp_BT: torch.Tensor, trainer_logp_BT: torch.Tensor,
                     mask_BT: torch.Tensor) -> dict[str, float]:
    """Mean and max |engine - trainer| over response tokens (logged every step)."""
    diff = (engine_logp_BT - trainer_logp_BT).abs() * mask_BT
    n = mask_BT.sum().clamp(min=1)
    return {"logprob_diff_mean": float(diff.sum() / n), "logprob_diff_max": float(diff.max())}
