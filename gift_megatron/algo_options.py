"""The algorithms' names and GIFT's loss options: pure Python (no torch), so the config schema can
take its defaults from here without importing the algorithm core. algo/losses.py uses them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

ALGORITHMS = ("gift", "grpo", "dapo", "gspo")
"""The trainer's algorithms (AlgoConfig.name), the one list of them."""
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
BASELINES = ("reference", "proximal")


@dataclass(frozen=True)
class GiftOptions:
    """GIFT's loss options, the one place their defaults live (AlgoConfig's GIFT fields take theirs from
    here); `gift_loss` and `gift_group_statistics` take them together, so the two never disagree."""

    baseline: str = "reference"
    """The implicit reward's baseline policy: `reference` (the paper) or `proximal` (the trainer at the
    step's start; the authors' code, where it is called the old policy)."""
    length_norm_power: float = 0.0
    """p in s / L^p (0: plain sum of token log-ratios)."""
    detach_stats: bool = True
    """Detach the implicit reward's group mean/std (gradient only through s_i)."""
    implicit_std_floor: float = 1.0
    """Floor on the implicit reward's group std in the z-score's denominator (> 0)."""
    z_scale: float = 1.0
    """z_i is multiplied by this before the MSE."""
    skip_uninformative_groups: bool = False
    """Groups whose rewards are all equal contribute nothing."""
    eps: float = 1e-6
    """The eps of the z-score (s - mean) / (std + eps); AlgoConfig.adv_eps."""

    @classmethod
    def of(cls, algo: Any) -> GiftOptions:
        """From an AlgoConfig (or anything with its field names; `adv_eps` is the z-scores' eps)."""
        return cls(**{f.name: getattr(algo, "adv_eps" if f.name == "eps" else f.name) for f in fields(cls)})
