"""Training-inference mismatch: the engine's sampled-token log-probs vs the trainer's recomputation."""

from __future__ import annotations

import torch


def mismatch_stats(behaviour_logp_BT: torch.Tensor, trainer_logp_BT: torch.Tensor,
                   mask_BT: torch.Tensor) -> torch.Tensor:
    """[sum |engine - trainer|, response tokens, max |engine - trainer|] (float64; sum-reducible, then max)."""
    diff = (behaviour_logp_BT - trainer_logp_BT).abs() * mask_BT
    return torch.tensor([float(diff.sum()), float(mask_BT.sum()), float(diff.max())], dtype=torch.float64)


def summarize(stats: torch.Tensor) -> dict[str, float]:
    return {"logprob_diff_mean": float(stats[0] / stats[1].clamp(min=1)), "logprob_diff_max": float(stats[2])}


def logprob_mismatch(behaviour_logp_BT: torch.Tensor, trainer_logp_BT: torch.Tensor,
                     mask_BT: torch.Tensor) -> dict[str, float]:
    """Mean and max |engine - trainer| over response tokens (logged every step)."""
    return summarize(mismatch_stats(behaviour_logp_BT, trainer_logp_BT, mask_BT))


DEFAULT_MAX_MISMATCH = {"float32": 1e-3, "bfloat16": 1e-1, "float16": 1e-1}
"""rollout.max_logprob_mismatch when unset, by model.params_dtype: the mean |engine - trainer| per
response token above which the engine is taken to sample from other weights than the trainer's
(docs/rollouts.md, "The mismatch alarm"; docs/reliability.md)."""


class MismatchError(RuntimeError):
    """The engine's log-probs disagreed with the trainer's for too many checked steps in a row."""


class MismatchAlarm:
    """Each verified step: a mean |diff| above `threshold` warns; `patience` such steps in a row raise
    MismatchError naming the likely causes. Every rank sees the same (all-reduced) numbers, so every
    rank raises together."""

    def __init__(self, threshold: float, patience: int, log) -> None:
        self.threshold, self.patience, self.log = threshold, patience, log
        self.in_a_row = 0

    def check(self, step: int, stats: dict[str, float]) -> None:
        mean = stats["logprob_diff_mean"]
        if not mean > self.threshold and mean == mean:  # NaN counts as a mismatch
            self.in_a_row = 0
            return
        self.in_a_row += 1
        message = (f"step {step}: the engine's log-probs differ from the trainer's by {mean:.3g} nats per token on "
                   f"average (max {stats['logprob_diff_max']:.3g}); rollout.max_logprob_mismatch={self.threshold:g}")
        if self.in_a_row < self.patience:
            self.log.warning("%s (%d of %d checked steps in a row before the run stops)", message, self.in_a_row,
                             self.patience)
            return
        raise MismatchError(
            f"{message}, {self.in_a_row} checked steps in a row: the engine is not sampling from the trainer's "
            f"weights. Likely causes: a weight sync that missed or corrupted tensors (a tied LM head, a fused "
            f"qkv/gate_up split across buckets: see the vLLM log), a model.params_dtype or rollout.temperature/"
            f"top_p that differs between engine and trainer, or a converted checkpoint whose config does not "
            f"match its weights. If the difference is expected numerics (e.g. bf16 kernels), raise "
            f"rollout.max_logprob_mismatch")
