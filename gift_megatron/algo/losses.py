"""GIFT and the baseline policy losses (GRPO, DAPO, GSPO). Pure torch; process groups passed in.

Legend: B = samples held by this rank in this micro-batch, T = response positions, P = groups.

Every loss returns `(loss, metrics)` where `loss` is this micro-batch's share of the GLOBAL loss:
its sum over all micro-batches and all data-parallel ranks is the loss of the whole mini-batch,
because each aggregation divides by counts taken over the whole mini-batch (`LossNorm`, computed
once per mini-batch by `global_norm`). Summing gradients over micro-batches and all-reducing them
(SUM) over DP therefore gives exactly the single-process gradient, whatever the split.
Metrics are detached 0-dim tensors, computed under no_grad: the caller reduces them once after the
schedule (no host sync per micro-batch on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from gift_megatron.algo.grouping import all_reduce_sum, group_stats, group_zscore

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class LossBatch:
    """One micro-batch on one rank. Token tensors are aligned with the response tokens."""

    logp_BT: torch.Tensor  # current policy log-probs of the sampled tokens (requires grad)
    mask_BT: torch.Tensor  # 1.0 on response tokens, 0.0 on padding
    advantages_B: torch.Tensor | None = None  # explicit group advantages (see advantages.group_advantages)
    rewards_B: torch.Tensor | None = None  # explicit rewards (GIFT's beta(x) metric)
    group_index_B: torch.Tensor | None = None  # prompt of each sample in [0, num_groups)
    num_groups: int = 0
    old_logp_BT: torch.Tensor | None = None  # rollout-time policy (detached)
    ref_logp_BT: torch.Tensor | None = None  # frozen reference policy (detached)


@dataclass
class LossNorm:
    """Counts over the whole mini-batch (every micro-batch, every DP rank)."""

    num_samples: float
    num_tokens: float
    max_response_length: float  # Dr. GRPO's constant for seq-mean-token-sum-norm


def global_norm(
    mask_BT: torch.Tensor, max_response_length: int, dp_group: dist.ProcessGroup | None = None
) -> LossNorm:
    """LossNorm of a whole mini-batch from this rank's masks (all of its micro-batches together)."""
    counts = torch.tensor([mask_BT.shape[0], mask_BT.sum().item()], dtype=torch.float64)
    counts = all_reduce_sum(counts, dp_group)
    return LossNorm(float(counts[0]), float(counts[1]), float(max_response_length))


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, norm: LossNorm) -> torch.Tensor:
    """Token losses -> this micro-batch's share of the mini-batch loss."""
    masked_BT = loss_BT * mask_BT
    if mode == "token-mean":  # DAPO: every token of the mini-batch weighs the same
        return masked_BT.sum() / norm.num_tokens
    if mode == "seq-mean-token-mean":  # GRPO: mean over each sequence, then over sequences
        per_seq_B = masked_BT.sum(-1) / mask_BT.sum(-1).clamp(min=1)
        return per_seq_B.sum() / norm.num_samples
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: token sums over a constant length
        return masked_BT.sum() / (norm.num_samples * norm.max_response_length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}: use one of {AGG_MODES}")


def _seq_sum(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return (x_BT * mask_BT).sum(-1)


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return _seq_sum(x_BT, mask_BT).sum() / mask_BT.sum().clamp(min=1)


def _percentiles(x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """p10 / median / p90 of the finite values; NaN when there are none (the same keys every call, so
    ranks reduce the same metrics; the reduction leaves NaNs out)."""
    x = x[torch.isfinite(x)].double()
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=x.device)
    q = torch.quantile(x, q) if x.numel() else torch.full_like(q, float("nan"))
    return {f"{prefix}_p10": q[0], f"{prefix}_median": q[1], f"{prefix}_p90": q[2]}


def gift_loss(
    batch: LossBatch,
    norm: LossNorm,
    *,
    baseline: str = "reference",
    length_norm_power: float = 0.0,
    detach_stats: bool = True,
    implicit_std_floor: float = 1.0,
    z_scale: float = 1.0,
    skip_uninformative_groups: bool = False,
    eps: float = 1e-6,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GIFT: mean over samples of (A_i - z_i)^2 (DESIGN.md).

    s_i = sum_t (log pi - log pi_base) / L_i^p is the implicit reward, pi_base the frozen reference
    (`reference`) or the rollout-time policy (`old`). z_i is s_i z-scored over its whole group
    (statistics all-reduced over `dp_group`), scaled by `z_scale`. Detached statistics (default):
    gradient flows only through s_i; otherwise also through the group mean and std.

    Degenerate groups: the std in the denominator is floored at `implicit_std_floor` (> 0). Below
    the floor z_i = (s_i - mean) / floor, i.e. the loss regresses the implicit reward onto
    floor * A_i (beta(x) capped at std_r / floor): finite loss and |dz/ds| <= 1 / floor, even at
    step 0 where s == 0 for every sample, for singleton groups and equal rewards (A == 0).

    `skip_uninformative_groups`: groups whose rewards are all equal (A == 0) contribute nothing (their
    target z = 0 pulls the samples' implicit rewards together, towards the baseline, with no reward
    information); the mean still divides by every sample, as GRPO's zero advantages do.
    """
    base_BT = batch.ref_logp_BT if baseline == "reference" else batch.old_logp_BT
    if base_BT is None:
        raise ValueError(f"GIFT baseline {baseline!r} needs its log-probs in the batch")
    mask_BT = batch.mask_BT
    s_B = _seq_sum(batch.logp_BT - base_BT, mask_BT)  # implicit reward (log-ratio sum)
    if length_norm_power:
        s_B = s_B / mask_BT.sum(-1).clamp(min=1).pow(length_norm_power)
    z_B, s_stats = group_zscore(
        s_B, batch.group_index_B, batch.num_groups,
        eps=eps, std_floor=implicit_std_floor, detach_stats=detach_stats, process_group=dp_group,
    )
    z_B = z_scale * z_B
    r_stats = group_stats(batch.rewards_B, batch.group_index_B, batch.num_groups, dp_group)
    # Sample mean over the whole mini-batch: divide by the global sample count.
    sq_err_B = (batch.advantages_B.to(torch.float64) - z_B).square()
    if skip_uninformative_groups:
        sq_err_B = sq_err_B * (r_stats.std_P[batch.group_index_B] > 0)
    loss = (sq_err_B.sum() / norm.num_samples).float()
    with torch.no_grad():
        beta_P = r_stats.std_P / s_stats.std_P  # self-tuned KL coefficient per prompt
        informative_P = (r_stats.std_P > 0) & (s_stats.std_P > 0)
        metrics = {
            "implicit_reward_mean": s_B.detach().mean(),
            "implicit_std_median": s_stats.std_P.detach().median(),
            "frac_groups_below_floor": (s_stats.std_P < implicit_std_floor).double().mean(),
            "z_abs_mean": z_B.detach().abs().mean(),
            **_percentiles(torch.log(beta_P[informative_P]), "log_beta"),
        }
    return loss, metrics


def sft_loss(batch: LossBatch, norm: LossNorm, *, dp_group: dist.ProcessGroup | None = None):
    """Supervised warm-up: mean negative log-likelihood over every response token of the mini-batch."""
    loss = aggregate(-batch.logp_BT, batch.mask_BT, "token-mean", norm)
    with torch.no_grad():
        metrics = {"nll": _masked_mean(-batch.logp_BT.detach(), batch.mask_BT)}
    return loss, metrics


def _ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "ratio_mean": _masked_mean(log_ratio.exp(), mask),
        "clip_frac": _masked_mean(clipped.float(), mask),
        "approx_kl_old": _masked_mean(0.5 * log_ratio.square(), mask),
    }


def _k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d_BT = ref_logp_BT - logp_BT
    return d_BT.exp() - d_BT - 1


def ppo_clip_loss(
    batch: LossBatch,
    norm: LossNorm,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    kl_coef: float = 0.0,
    loss_agg_mode: str = "seq-mean-token-mean",
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's (and DAPO's) token-level PPO-clip surrogate, optional k3 KL to the reference.

    loss_t = max(-A r_t, -A clip(r_t, 1 - low, 1 + high)) + kl_coef * k3_t, r_t = pi / pi_old.
    GRPO: low = high = 0.2, seq-mean-token-mean. DAPO: 0.2 / 0.28 (clip-higher), token-mean, no KL.
    """
    if batch.old_logp_BT is None:
        raise ValueError("PPO-clip losses need the rollout policy's log-probs (old_logp)")
    log_ratio_BT = batch.logp_BT - batch.old_logp_BT
    ratio_BT = log_ratio_BT.exp()
    adv_BT = batch.advantages_B.unsqueeze(-1).to(ratio_BT.dtype)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    metrics: dict[str, torch.Tensor] = {}
    if kl_coef:
        if batch.ref_logp_BT is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs (ref_logp)")
        kl_BT = _k3_kl(batch.logp_BT, batch.ref_logp_BT)
        loss_BT = loss_BT + kl_coef * kl_BT
        metrics["kl_ref"] = _masked_mean(kl_BT.detach(), batch.mask_BT)
    loss = aggregate(loss_BT, batch.mask_BT, loss_agg_mode, norm)
    with torch.no_grad():
        metrics.update(_ratio_metrics(log_ratio_BT, batch.mask_BT, clipped_BT > unclipped_BT))
    return loss, metrics


def gspo_loss(
    batch: LossBatch,
    norm: LossNorm,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
    kl_coef: float = 0.0,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: sequence-level ratio s_i = exp(mean_t log(pi / pi_old)), clipped at 3e-4 / 4e-4.

    loss = mean over sequences of max(-A s_i, -A clip(s_i, 1 - low, 1 + high)) (seq-mean), plus an
    optional k3 KL with seq-mean-token-mean aggregation.
    """
    if batch.old_logp_BT is None:
        raise ValueError("GSPO needs the rollout policy's log-probs (old_logp)")
    mask_BT = batch.mask_BT
    log_ratio_BT = batch.logp_BT - batch.old_logp_BT
    seq_log_ratio_B = _seq_sum(log_ratio_BT, mask_BT) / mask_BT.sum(-1).clamp(min=1)
    seq_ratio_B = seq_log_ratio_B.exp()
    adv_B = batch.advantages_B.to(seq_ratio_B.dtype)
    unclipped_B = -adv_B * seq_ratio_B
    clipped_B = -adv_B * seq_ratio_B.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    loss = torch.maximum(unclipped_B, clipped_B).sum() / norm.num_samples
    metrics: dict[str, torch.Tensor] = {}
    if kl_coef:
        if batch.ref_logp_BT is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs (ref_logp)")
        kl_BT = _k3_kl(batch.logp_BT, batch.ref_logp_BT)
        loss = loss + kl_coef * aggregate(kl_BT, mask_BT, "seq-mean-token-mean", norm)
        metrics["kl_ref"] = _masked_mean(kl_BT.detach(), mask_BT)
    with torch.no_grad():
        metrics.update({
            "ratio_mean": seq_ratio_B.detach().mean(),
            "clip_frac": (clipped_B > unclipped_B).float().mean(),
            "approx_kl_old": _masked_mean(0.5 * log_ratio_BT.square(), mask_BT),
        })
    return loss, metrics
