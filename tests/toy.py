"""A toy rollout batch shared by the loss tests: P prompts x G samples, T response positions."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from gift_megatron.algo import LossBatch, LossNorm, group_advantages

# (name, AlgoConfig-like fields) for every loss the trainer can build, with settings that exercise
# the interesting branches (clipping, KL, length normalisation, non-detached statistics).
LOSS_CASES = {
    "gift": dict(name="gift", baseline="reference", length_norm_power=0.0, detach_stats=True,
                 implicit_std_floor=1e-2, z_scale=1.0, adv_eps=1e-6, skip_uninformative_groups=False),
    "gift_old_lennorm": dict(name="gift", baseline="proximal", length_norm_power=1.0, detach_stats=True,
                             implicit_std_floor=1e-2, z_scale=2.0, adv_eps=1e-6, skip_uninformative_groups=True),
    "gift_attached": dict(name="gift", baseline="reference", length_norm_power=0.0, detach_stats=False,
                          implicit_std_floor=1e-2, z_scale=1.0, adv_eps=1e-6, skip_uninformative_groups=False),
    "grpo_kl": dict(name="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2, kl_coef=0.05,
                    loss_agg_mode="seq-mean-token-mean", tis_cap=0.0),
    "dapo": dict(name="dapo", clip_ratio_low=0.2, clip_ratio_high=0.28, kl_coef=0.0, loss_agg_mode="token-mean",
                 tis_cap=0.0),
    "drgrpo": dict(name="grpo", clip_ratio_low=0.2, clip_ratio_high=0.2, kl_coef=0.0,
                   loss_agg_mode="seq-mean-token-sum-norm", tis_cap=0.0),
    "gspo": dict(name="gspo", clip_ratio_low=3e-4, clip_ratio_high=4e-4, kl_coef=0.0, tis_cap=0.0),
}


def algo_cfg(case: str) -> SimpleNamespace:
    return SimpleNamespace(**LOSS_CASES[case])


@dataclass
class ToyRollout:
    feats_BTH: torch.Tensor
    target_BT: torch.Tensor
    mask_BT: torch.Tensor
    rewards_B: torch.Tensor
    group_index_B: torch.Tensor
    proximal_logp_BT: torch.Tensor
    ref_logp_BT: torch.Tensor
    weight_HV: torch.Tensor  # the toy policy: logits = feats @ weight
    num_groups: int


def make_rollout(P=4, G=4, T=5, H=8, V=16, seed=0, old_noise=0.3) -> ToyRollout:
    """Random but reproducible batch; responses have different lengths; rewards in {0, 0.5, 1}."""
    g = torch.Generator().manual_seed(seed)
    B = P * G
    feats = torch.randn(B, T, H, generator=g)
    weight = torch.randn(H, V, generator=g) * 0.5
    target = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 3, (B,), generator=g).float() / 2
    group_index = torch.arange(P).repeat_interleave(G)
    logp = torch.log_softmax(feats @ weight, -1).gather(-1, target[..., None]).squeeze(-1)
    old = logp + old_noise * torch.randn(B, T, generator=g)
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    return ToyRollout(feats, target, mask, rewards, group_index, old, ref, weight, P)


def loss_batch(r: ToyRollout, logp_BT: torch.Tensor, idx: torch.Tensor | None = None,
               group_index_B: torch.Tensor | None = None, num_groups: int | None = None,
               dp_group=None) -> LossBatch:
    """The LossBatch of samples `idx` (default all), advantages over whole groups."""
    idx = torch.arange(r.mask_BT.shape[0]) if idx is None else idx
    gi = r.group_index_B[idx] if group_index_B is None else group_index_B
    n = r.num_groups if num_groups is None else num_groups
    adv = group_advantages(r.rewards_B[idx], gi, n, process_group=dp_group)
    return LossBatch(logp_BT=logp_BT, mask_BT=r.mask_BT[idx], advantages_B=adv, rewards_B=r.rewards_B[idx],
                     group_index_B=gi, num_groups=n, proximal_logp_BT=r.proximal_logp_BT[idx],
                     ref_logp_BT=r.ref_logp_BT[idx])


def full_norm(r: ToyRollout) -> LossNorm:
    return LossNorm(num_samples=float(r.mask_BT.shape[0]), num_tokens=float(r.mask_BT.sum()),
                    max_response_length=float(r.mask_BT.shape[1]))
