"""The algorithm core: pure torch, no megatron-core or vLLM imports; process groups are arguments."""

from __future__ import annotations

from functools import partial
from typing import Any

from gift_megatron.algo.advantages import GroupFilter, group_advantages, overlong_penalty
from gift_megatron.algo.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from gift_megatron.algo.losses import (
    GroupStatisticsFn,
    LossBatch,
    LossFn,
    LossNorm,
    aggregate,
    gift_group_statistics,
    gift_loss,
    global_norm,
    gspo_loss,
    ppo_clip_loss,
    sft_loss,
)
from gift_megatron.algo_options import AGG_MODES, ALGORITHMS, BASELINES, GiftOptions

__all__ = [
    "AGG_MODES", "ALGORITHMS", "BASELINES", "GiftOptions", "GroupFilter", "GroupStatisticsFn", "LossBatch", "LossFn",
    "LossNorm", "aggregate", "build_group_statistics", "build_loss",
    "gift_group_statistics", "gift_loss",
    "global_norm", "group_advantages", "gspo_loss", "overlong_penalty", "ppo_clip_loss", "sft_loss",
    "vocab_parallel_entropy", "vocab_parallel_logprobs",
]


def build_loss(algo: Any) -> LossFn:
    """The loss of `algo` (an AlgoConfig) as `fn(batch, norm, dp_group=...) -> (loss, metrics)`."""
    if algo.name == "gift":
        return partial(gift_loss, options=GiftOptions.of(algo))
    if algo.name in ("grpo", "dapo"):  # DAPO is PPO-clip with its own defaults (conf/algo/dapo.yaml)
        return partial(
            ppo_clip_loss, clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
            kl_coef=algo.kl_coef, loss_agg_mode=algo.loss_agg_mode, tis_cap=algo.tis_cap,
        )
    if algo.name == "gspo":
        return partial(
            gspo_loss, clip_ratio_low=algo.clip_ratio_low, clip_ratio_high=algo.clip_ratio_high,
            kl_coef=algo.kl_coef, tis_cap=algo.tis_cap,
        )
    raise ValueError(f"unknown algo.name {algo.name!r}: use one of {ALGORITHMS}")


def build_group_statistics(algo: Any) -> GroupStatisticsFn | None:
    """For losses whose per-sample terms need whole-group statistics of the current policy (GIFT's
    z-scored implicit reward): `fn(batch, norm, dp_group=...) -> WholeGroups`, taken over a whole
    mini-batch before token-budget micro-batches cut its groups. None for the others (their terms
    are per sample or per token)."""
    return partial(gift_group_statistics, options=GiftOptions.of(algo)) if algo.name == "gift" else None
