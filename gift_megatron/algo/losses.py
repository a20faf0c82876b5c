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
from typing import Protocol

import torch
import torch.distributed as dist

from gift_megatron.algo.grouping import GroupStats, all_reduce_sum, group_stats, group_sum, group_zscore, zscore_with
from gift_megatron.algo_options import AGG_MODES, GiftOptions

DEFAULT_GIFT = GiftOptions()

class LossFn(Protocol):
    """An algorithm's loss (algo.build_loss): this micro-batch's share of the mini-batch loss, and its
    metrics as detached 0-dim tensors."""

    def __call__(self, batch: LossBatch, norm: LossNorm, *,
                 dp_group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


class GroupStatisticsFn(Protocol):
    """Whole-group statistics of a mini-batch before micro-batches cut its groups (algo.build_group_statistics)."""

    def __call__(self, batch: LossBatch, norm: LossNorm, *, dp_group: dist.ProcessGroup | None = None) -> WholeGroups:
        ...


@dataclass
class LossBatch:
    """One micro-batch on one rank. Token tensors are aligned with the response tokens."""

    logp_BT: torch.Tensor  # current policy log-probs of the sampled tokens (requires grad)
    mask_BT: torch.Tensor  # 1.0 on response tokens, 0.0 on padding
    advantages_B: torch.Tensor | None = None  # explicit group advantages (see advantages.group_advantages)
    rewards_B: torch.Tensor | None = None  # explicit rewards (GIFT's beta(x) metric)
    group_index_B: torch.Tensor | None = None  # prompt of each sample in [0, num_groups)
    num_groups: int = 0
    proximal_logp_BT: torch.Tensor | None = None  # the trainer at the step's start (detached; PPO ratios)
    ref_logp_BT: torch.Tensor | None = None  # frozen reference policy (detached)
    behaviour_logp_BT: torch.Tensor | None = None  # the engine's: the weights that generated (truncated IS)
    groups: WholeGroups | None = None  # GIFT: statistics of whole groups, when this micro-batch cuts groups


@dataclass
class WholeGroups:
    """GIFT's per-prompt statistics over a whole mini-batch at the current weights, taken before its
    micro-batches cut groups (token-budget micro-batches, `gift_group_statistics`). Each micro-batch's
    loss then needs no collective, and its gradient is still exactly the whole-batch one: with detached
    statistics they are constants; otherwise `dmean_P` and `dstd_P` carry the gradient that flows
    through the group mean and std (dL/dmean / n, and dL/dD / ((n - 1) std) where the std is above the
    floor), applied to each member of the group by a surrogate term of value zero."""

    implicit: GroupStats  # of s, the implicit reward
    rewards: GroupStats
    dmean_P: torch.Tensor
    dstd_P: torch.Tensor


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


def _needed(t: torch.Tensor | None, name: str) -> torch.Tensor:
    """A LossBatch field the loss cannot do without."""
    if t is None:
        raise ValueError(f"this loss needs LossBatch.{name}, which is None")
    return t


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
    options: GiftOptions = DEFAULT_GIFT,
    *,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GIFT: mean over samples of (A_i - z_i)^2 (docs/design.md).

    s_i = sum_t (log pi - log pi_base) / L_i^p is the implicit reward, pi_base the reference
    (`reference`) or the proximal policy, the trainer at the step's start (`proximal`). z_i is s_i
    z-scored over its whole group (statistics all-reduced over `dp_group`), scaled by `z_scale`.
    Detached statistics (default):
    gradient flows only through s_i; otherwise also through the group mean and std.

    Degenerate groups: the std in the denominator is floored at `implicit_std_floor` (> 0). Below
    the floor z_i = (s_i - mean) / floor, i.e. the loss regresses the implicit reward onto
    floor * A_i (beta(x) capped at std_r / floor): finite loss and |dz/ds| <= 1 / floor, even at
    step 0 where s == 0 for every sample, for singleton groups and equal rewards (A == 0).

    `skip_uninformative_groups`: groups whose rewards are all equal (A == 0) contribute nothing (their
    target z = 0 pulls the samples' implicit rewards together, towards the baseline, with no reward
    information); the mean still divides by every sample, as GRPO's zero advantages do.
    """
    o = options
    s_B = _implicit_reward(batch, o.baseline, o.length_norm_power)
    index_B, whole = _needed(batch.group_index_B, "group_index_B"), batch.groups
    rewards_B, advantages_B = _needed(batch.rewards_B, "rewards_B"), _needed(batch.advantages_B, "advantages_B")
    if whole is None:  # this micro-batch holds whole groups (on every DP rank): statistics from it
        z_B, s_stats = group_zscore(
            s_B, index_B, batch.num_groups,
            eps=o.eps, std_floor=o.implicit_std_floor, detach_stats=o.detach_stats, process_group=dp_group,
        )
        r_stats = group_stats(rewards_B, index_B, batch.num_groups, dp_group)
    else:  # taken over the whole mini-batch beforehand (see WholeGroups)
        s_stats, r_stats = whole.implicit, whole.rewards
        z_B = zscore_with(s_B, s_stats, index_B, eps=o.eps, std_floor=o.implicit_std_floor)
    z_B = o.z_scale * z_B
    # Sample mean over the whole mini-batch: divide by the global sample count.
    sq_err_B = (advantages_B.to(torch.float64) - z_B).square()
    if o.skip_uninformative_groups:
        sq_err_B = sq_err_B * (r_stats.std_P[index_B] > 0)
    loss = sq_err_B.sum() / norm.num_samples
    if whole is not None and not o.detach_stats:  # value 0; gradient through the group's mean and std
        s = s_B.to(torch.float64)
        loss = loss + ((s - s.detach()) * (whole.dmean_P[index_B] + whole.dstd_P[index_B]
                                           * (s.detach() - s_stats.mean_P[index_B]))).sum()
    loss = loss.float()
    with torch.no_grad():
        beta_P = r_stats.std_P / s_stats.std_P  # self-tuned KL coefficient per prompt
        informative_P = (r_stats.std_P > 0) & (s_stats.std_P > 0)
        metrics = {
            "implicit_reward_mean": s_B.detach().mean(),
            "implicit_std_median": s_stats.std_P.detach().median(),
            "frac_groups_below_floor": (s_stats.std_P < o.implicit_std_floor).double().mean(),
            "z_abs_mean": z_B.detach().abs().mean(),
            **_percentiles(torch.log(beta_P[informative_P]), "log_beta"),
        }
    return loss, metrics


def _implicit_reward(batch: LossBatch, baseline: str, length_norm_power: float) -> torch.Tensor:
    """s_i = sum_t (log pi - log pi_base) / L_i^p."""
    base_BT = batch.ref_logp_BT if baseline == "reference" else batch.proximal_logp_BT
    if base_BT is None:
        raise ValueError(f"GIFT baseline {baseline!r} needs its log-probs in the batch")
    s_B = _seq_sum(batch.logp_BT - base_BT, batch.mask_BT)
    if length_norm_power:
        s_B = s_B / batch.mask_BT.sum(-1).clamp(min=1).pow(length_norm_power)
    return s_B


@torch.no_grad()
def gift_group_statistics(
    batch: LossBatch,
    norm: LossNorm,
    options: GiftOptions = DEFAULT_GIFT,
    *,
    dp_group: dist.ProcessGroup | None = None,
) -> WholeGroups:
    """`WholeGroups` of a whole mini-batch (this rank's rows, every DP rank taking part), from log-probs
    at the current weights (`batch.logp_BT`, no gradient needed): gift_loss's options, same values."""
    o = options
    index_B, P = _needed(batch.group_index_B, "group_index_B"), batch.num_groups
    s_B = _implicit_reward(batch, o.baseline, o.length_norm_power).to(torch.float64)
    s, r = group_stats(s_B, index_B, P, dp_group), group_stats(_needed(batch.rewards_B, "rewards_B"), index_B, P,
                                                               dp_group)
    dmean_P, dstd_P = torch.zeros_like(s.mean_P), torch.zeros_like(s.mean_P)
    if not o.detach_stats:
        # L = sum_i w_i (A_i - z_i)^2 / N, z_i = k (s_i - mean) / D, D = max(std, floor) + eps.
        D_P = s.std_P.clamp(min=o.implicit_std_floor) + o.eps
        z_B = o.z_scale * zscore_with(s_B, s, index_B, eps=o.eps, std_floor=o.implicit_std_floor)
        w_B = (r.std_P[index_B] > 0).double() if o.skip_uninformative_groups else torch.ones_like(s_B)
        e_B = 2 * w_B * (_needed(batch.advantages_B, "advantages_B").to(torch.float64) - z_B) / norm.num_samples
        dL_dmean_P = group_sum(e_B, index_B, P, dp_group) * o.z_scale / D_P  # dz_i/dmean = -k / D
        dL_dD_P = group_sum(e_B * z_B, index_B, P, dp_group) / D_P  # dz_i/dD = -z_i / D
        dmean_P = dL_dmean_P / s.count_P
        moving = (s.std_P > o.implicit_std_floor) & (s.std_P > 0)  # the clamp passes no gradient below the floor
        dstd_P = torch.where(moving, dL_dD_P / ((s.count_P - 1).clamp(min=1) * s.std_P.clamp(min=1e-300)),
                             torch.zeros_like(dstd_P))
    return WholeGroups(s, r, dmean_P, dstd_P)


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
        "approx_kl_proximal": _masked_mean(0.5 * log_ratio.square(), mask),
    }


def _behaviour(batch: LossBatch) -> torch.Tensor:
    if batch.behaviour_logp_BT is None:
        raise ValueError("truncated IS (algo.tis_cap > 0) needs the engine's log-probs of the samples (behaviour_logp)")
    return batch.behaviour_logp_BT


def _tis_weight(log_w: torch.Tensor, mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """min(exp(log_w), cap), detached (a weight on the loss, never differentiated), and its metrics:
    the mean weight and the fraction truncated, over `mask`."""
    with torch.no_grad():
        raw = log_w.exp()
        weight = raw.clamp(max=cap)
        mean = lambda x: (x * mask).sum() / mask.sum().clamp(min=1)  # noqa: E731
        return weight, {"tis_weight_mean": mean(weight), "tis_frac_truncated": mean((raw > cap).to(weight.dtype))}


def _k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d_BT = ref_logp_BT - logp_BT
    return d_BT.exp() - d_BT - 1


def ppo_clip_loss(
    batch: LossBatch,
    norm: LossNorm,
    *,
    clip_ratio_low: float,
    clip_ratio_high: float,
    kl_coef: float,
    loss_agg_mode: str,
    tis_cap: float,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's (and DAPO's) token-level PPO-clip surrogate, optional k3 KL to the reference. The options
    have no defaults here: AlgoConfig and conf/algo/*.yaml hold them (algo.build_loss passes them).

    loss_t = w_t max(-A r_t, -A clip(r_t, 1 - low, 1 + high)) + kl_coef * k3_t, r_t = pi / pi_prox.
    GRPO: low = high = 0.2, seq-mean-token-mean. DAPO: 0.2 / 0.28 (clip-higher), token-mean, no KL.
    pi_prox is the proximal policy (the trainer's weights at the start of the step); with rollouts
    generated by older weights (rollout.max_staleness > 0) `tis_cap` > 0 adds decoupled PPO's
    importance weight w_t = min(pi_prox / pi_behaviour, tis_cap) (detached; truncated IS, verl's and
    NeMo-RL's correction), pi_behaviour the engine's log-probs; w_t = 1 otherwise.
    """
    if batch.proximal_logp_BT is None:
        raise ValueError("PPO-clip losses need the proximal policy's log-probs (proximal_logp: the trainer at the "
                         "step's start)")
    log_ratio_BT = batch.logp_BT - batch.proximal_logp_BT
    ratio_BT = log_ratio_BT.exp()
    adv_BT = _needed(batch.advantages_B, "advantages_B").unsqueeze(-1).to(ratio_BT.dtype)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    metrics: dict[str, torch.Tensor] = {}
    if tis_cap:
        weight_BT, metrics = _tis_weight(batch.proximal_logp_BT - _behaviour(batch), batch.mask_BT, tis_cap)
        loss_BT = loss_BT * weight_BT
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
    clip_ratio_low: float,
    clip_ratio_high: float,
    kl_coef: float,
    tis_cap: float,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: sequence-level ratio s_i = exp(mean_t log(pi / pi_prox)), clipped at 1 - low / 1 + high
    (the paper's 3e-4 / 4e-4: conf/algo/gspo.yaml).

    loss = mean over sequences of w_i max(-A s_i, -A clip(s_i, 1 - low, 1 + high)) (seq-mean), plus
    an optional k3 KL with seq-mean-token-mean aggregation. `tis_cap` > 0: w_i = min(exp(mean_t
    log(pi_prox / pi_behaviour)), tis_cap), the sequence-level truncated importance weight (ppo_clip_loss).
    """
    if batch.proximal_logp_BT is None:
        raise ValueError("GSPO needs the proximal policy's log-probs (proximal_logp: the trainer at the step's start)")
    mask_BT = batch.mask_BT
    log_ratio_BT = batch.logp_BT - batch.proximal_logp_BT
    seq_log_ratio_B = _seq_sum(log_ratio_BT, mask_BT) / mask_BT.sum(-1).clamp(min=1)
    seq_ratio_B = seq_log_ratio_B.exp()
    adv_B = _needed(batch.advantages_B, "advantages_B").to(seq_ratio_B.dtype)
    unclipped_B = -adv_B * seq_ratio_B
    clipped_B = -adv_B * seq_ratio_B.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    loss_B = torch.maximum(unclipped_B, clipped_B)
    metrics: dict[str, torch.Tensor] = {}
    if tis_cap:
        seq_behav_B = _seq_sum(batch.proximal_logp_BT - _behaviour(batch), mask_BT) / mask_BT.sum(-1).clamp(min=1)
        weight_B, metrics = _tis_weight(seq_behav_B, torch.ones_like(seq_behav_B), tis_cap)
        loss_B = loss_B * weight_B
    loss = loss_B.sum() / norm.num_samples
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
            "approx_kl_proximal": _masked_mean(0.5 * log_ratio_BT.square(), mask_BT),
        })
    return loss, metrics
