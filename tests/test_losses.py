"""Losses: hand-computed cases, float64 loop references (values and gradients), degenerate groups."""

import math
from types import SimpleNamespace

import pytest
import torch

from gift_megatron.algo import (
    GiftOptions,
    LossBatch,
    LossNorm,
    build_group_statistics,
    build_loss,
    gift_loss,
    gspo_loss,
    ppo_clip_loss,
)
from tests import reference as ref
from tests.toy import LOSS_CASES, algo_cfg, full_norm, loss_batch, make_rollout

S = 1 / math.sqrt(2)  # |A| of a 2-sample group with rewards {1, 0} (Bessel std = 1/sqrt(2))
# The losses' options have no defaults of their own (the config holds them): GRPO's and GSPO's here.
GRPO = dict(clip_ratio_low=0.2, clip_ratio_high=0.2, kl_coef=0.0, loss_agg_mode="seq-mean-token-mean", tis_cap=0.0)
GSPO = dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4, kl_coef=0.0, tis_cap=0.0)


def _two_groups(logp, old=None, ref_=None, T=1):
    """2 prompts x 2 samples, rewards (1, 0) in each: advantages (+S, -S, +S, -S)."""
    logp = torch.tensor(logp, dtype=torch.float32).view(4, T).requires_grad_()
    zeros = torch.zeros(4, T)
    batch = LossBatch(
        logp_BT=logp, mask_BT=torch.ones(4, T), advantages_B=torch.tensor([S, -S, S, -S]),
        rewards_B=torch.tensor([1.0, 0.0, 1.0, 0.0]), group_index_B=torch.tensor([0, 0, 1, 1]), num_groups=2,
        proximal_logp_BT=zeros if old is None else torch.tensor(old).view(4, T),
        ref_logp_BT=zeros if ref_ is None else ref_,
    )
    return batch, LossNorm(num_samples=4, num_tokens=4 * T, max_response_length=T)


def test_gift_hand_computed():
    # Group 0: s = (0.5, -0.5) ranks like the rewards: z = (+S, -S) = A, error 0.
    # Group 1: s = (-0.2, 0.2) reversed: z = (-S, +S), errors (2S)^2 = 2 each -> loss (0 + 0 + 2 + 2) / 4 = 1.
    batch, norm = _two_groups([0.5, -0.5, -0.2, 0.2])
    loss, metrics = gift_loss(batch, norm, GiftOptions(implicit_std_floor=1e-2))
    assert loss.item() == pytest.approx(1.0, abs=1e-5)
    loss.backward()
    # d/ds_i (A_i - (s_i - m)/sd)^2 / 4 = -2 (A_i - z_i) / (4 sd), with sd = 0.4 S and A_i - z_i = +-2S
    # in group 1: -+2 * 2S / (4 * 0.4 S) = -+2.5.
    expected = torch.tensor([0.0, 0.0, -2.5, 2.5]).view(4, 1)
    assert torch.allclose(batch.logp_BT.grad, expected, atol=1e-4)
    # beta(x) = std_r / std_s: group 0: S / (1 * S) = 1, group 1: S / (0.4 * S) = 2.5.
    assert metrics["log_beta_p10"] < metrics["log_beta_p90"]
    assert metrics["log_beta_median"] == pytest.approx(math.log(math.sqrt(2.5)), abs=1e-5)


def test_grpo_and_dapo_hand_computed():
    # Ratios 1.5 (A>0) and 0.5 (A<0) in group 0 are clipped, ratio 1 in group 1 is not.
    old = [math.log(1 / 1.5), math.log(1 / 0.5), 0.0, 0.0]
    batch, norm = _two_groups([0.0, 0.0, 0.0, 0.0], old=old)
    loss, metrics = ppo_clip_loss(batch, norm, **GRPO)
    assert loss.item() == pytest.approx((-S * 1.2 + S * 0.8 - S + S) / 4, abs=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(batch.logp_BT.grad.view(-1), torch.tensor([0.0, 0.0, -S / 4, S / 4]), atol=1e-6)
    batch, norm = _two_groups([0.0, 0.0, 0.0, 0.0], old=old)
    loss, _ = ppo_clip_loss(batch, norm, **{**GRPO, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean"})
    assert loss.item() == pytest.approx((-S * 1.28 + S * 0.8) / 4, abs=1e-6)


def test_gspo_hand_computed():
    # Sample 0: mean log-ratio 1e-3 -> ratio 1.0010005 > 1 + 4e-4, clipped; the others have ratio 1.
    logp = [1e-3, 1e-3, 0.1, -0.1, 0.0, 0.0, 0.0, 0.0]
    batch, norm = _two_groups(logp, T=2)
    loss, metrics = gspo_loss(batch, norm, **GSPO)
    assert loss.item() == pytest.approx((-S * (1 + 4e-4) + S - S + S) / 4, abs=1e-7)
    assert metrics["clip_frac"] == pytest.approx(0.25)


def _grad_vs_reference(case):
    r = make_rollout(seed=3, old_noise=1e-3 if case == "gspo" else 0.3)
    logp = torch.log_softmax(r.feats_BTH @ r.weight_HV, -1).gather(-1, r.target_BT[..., None]).squeeze(-1)
    logp = logp.detach().requires_grad_()
    loss, _ = build_loss(algo_cfg(case))(loss_batch(r, logp), full_norm(r))
    loss.backward()
    logp64 = logp.detach().double().requires_grad_()
    c = LOSS_CASES[case]
    if c["name"] == "gift":
        base = r.ref_logp_BT if c["baseline"] == "reference" else r.proximal_logp_BT
        expected = ref.ref_gift(logp64, base.double(), r.mask_BT, r.rewards_B, r.group_index_B,
                                floor=c["implicit_std_floor"], detach=c["detach_stats"], p=c["length_norm_power"],
                                z_scale=c["z_scale"])
    else:
        adv = ref.ref_advantages(r.rewards_B, r.group_index_B)
        if c["name"] == "gspo":
            expected = ref.ref_gspo(logp64, r.proximal_logp_BT.double(), r.mask_BT, adv,
                                    low=c["clip_ratio_low"], high=c["clip_ratio_high"])
        else:
            expected = ref.ref_ppo(logp64, r.proximal_logp_BT.double(), r.ref_logp_BT.double(), r.mask_BT, adv,
                                   low=c["clip_ratio_low"], high=c["clip_ratio_high"], kl_coef=c["kl_coef"],
                                   mode=c["loss_agg_mode"], max_len=r.mask_BT.shape[1])
    expected.backward()
    return loss, logp.grad, expected, logp64.grad


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_matches_float64_loop_reference(case):
    loss, grad, expected, expected_grad = _grad_vs_reference(case)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert expected_grad.abs().max() > 1e-3, "the case must exercise a non-trivial gradient"
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_ppo_cases_exercise_clipping():
    r = make_rollout(seed=3)
    for case in ("grpo_kl", "dapo"):
        _, metrics = build_loss(algo_cfg(case))(loss_batch(r, r.proximal_logp_BT * 0 + r.ref_logp_BT), full_norm(r))
        assert 0 < metrics["clip_frac"] < 1, case
    r = make_rollout(seed=3, old_noise=1e-3)
    logp = torch.log_softmax(r.feats_BTH @ r.weight_HV, -1).gather(-1, r.target_BT[..., None]).squeeze(-1)
    _, metrics = build_loss(algo_cfg("gspo"))(loss_batch(r, logp), full_norm(r))
    assert 0 < metrics["clip_frac"] < 1


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_permuting_samples_and_groups_leaves_loss_unchanged(case):
    r = make_rollout(seed=5)
    logp = torch.log_softmax(r.feats_BTH @ r.weight_HV, -1).gather(-1, r.target_BT[..., None]).squeeze(-1)
    fn, norm = build_loss(algo_cfg(case)), full_norm(r)
    loss, _ = fn(loss_batch(r, logp), norm)
    perm = torch.randperm(logp.shape[0], generator=torch.Generator().manual_seed(1))
    relabel = torch.tensor([2, 0, 3, 1])  # group g is called relabel[g]
    loss_p, _ = fn(loss_batch(r, logp[perm], idx=perm, group_index_B=relabel[r.group_index_B[perm]]), norm)
    assert loss_p.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_micro_batches_that_cut_groups_give_the_whole_batch_loss_and_gradient(case):
    """Token-budget micro-batches: samples in length order, so groups are cut. With the whole-group
    statistics taken first (GIFT), the summed micro-batch losses and their gradient equal the one-batch
    loss and gradient, for detached and attached statistics alike."""
    r = make_rollout(seed=7)
    norm, cfg = full_norm(r), algo_cfg(case)
    logp = torch.log_softmax(r.feats_BTH @ r.weight_HV, -1).gather(-1, r.target_BT[..., None]).squeeze(-1)
    whole_logp = logp.detach().clone().requires_grad_()
    loss, _ = build_loss(cfg)(loss_batch(r, whole_logp), norm)
    loss.backward()
    full = loss_batch(r, logp.detach())  # advantages over whole groups, as the rollout stage makes them
    statistics = build_group_statistics(cfg)
    assert (statistics is None) == (cfg.name != "gift")
    groups = statistics(full, norm) if statistics else None
    split_logp = logp.detach().clone().requires_grad_()
    order = r.mask_BT.sum(-1).argsort(descending=True, stable=True)
    total = 0.0
    for idx in order.tensor_split([3, 4, 9, 10]):  # uneven bins, every group cut
        mb = LossBatch(split_logp[idx], full.mask_BT[idx], full.advantages_B[idx], full.rewards_B[idx],
                       full.group_index_B[idx], full.num_groups, full.proximal_logp_BT[idx], full.ref_logp_BT[idx],
                       groups=groups)
        part, _ = build_loss(cfg)(mb, norm)
        part.backward()
        total += float(part.detach())
    assert total == pytest.approx(float(loss), rel=1e-6, abs=1e-7)
    assert whole_logp.grad.abs().max() > 1e-3
    torch.testing.assert_close(split_logp.grad, whole_logp.grad, rtol=1e-5, atol=1e-7)


def test_attached_statistics_matter_for_the_gradient():
    """The attached case above is not passing by accident: dropping WholeGroups' mean/std terms changes
    the gradient (so the surrogate term is what makes it exact)."""
    r = make_rollout(seed=7)
    norm, cfg = full_norm(r), algo_cfg("gift_attached")
    logp = torch.log_softmax(r.feats_BTH @ r.weight_HV, -1).gather(-1, r.target_BT[..., None]).squeeze(-1)
    full = loss_batch(r, logp.detach())
    groups = build_group_statistics(cfg)(full, norm)
    grads = []
    for g in (groups, type(groups)(groups.implicit, groups.rewards, groups.dmean_P * 0, groups.dstd_P * 0)):
        x = logp.detach().clone().requires_grad_()
        batch = LossBatch(x, full.mask_BT, full.advantages_B, full.rewards_B, full.group_index_B, full.num_groups,
                          full.proximal_logp_BT, full.ref_logp_BT, groups=g)
        build_loss(cfg)(batch, norm)[0].backward()
        grads.append(x.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-4


def _degenerate(rewards, group_index, num_groups, logp_minus_ref, detach=True, floor=1e-2):
    B = len(rewards)
    logp = torch.tensor(logp_minus_ref, dtype=torch.float32).view(B, 1).requires_grad_()
    from gift_megatron.algo import group_advantages

    gi, rw = torch.tensor(group_index), torch.tensor(rewards)
    batch = LossBatch(logp_BT=logp, mask_BT=torch.ones(B, 1), advantages_B=group_advantages(rw, gi, num_groups),
                      rewards_B=rw, group_index_B=gi, num_groups=num_groups, ref_logp_BT=torch.zeros(B, 1))
    loss, metrics = gift_loss(batch, LossNorm(B, B, 1), GiftOptions(detach_stats=detach, implicit_std_floor=floor))
    loss.backward()
    return loss, logp.grad, metrics


@pytest.mark.parametrize("detach", [True, False])
def test_gift_degenerate_groups_stay_finite_and_bounded(detach):
    floor = 1e-2
    cases = {
        "step 0 (s == 0 everywhere)": ([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], 2, [0.0] * 4),
        "singleton groups": ([1.0, 0.0, 0.5], [0, 1, 2], 3, [0.3, -0.2, 0.1]),
        "equal rewards": ([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], 2, [0.3, -0.1, 0.2, 0.5]),
        "equal implicit rewards": ([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], 2, [0.7, 0.7, -0.3, -0.3]),
        "tiny implicit spread": ([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], 2, [1e-9, -1e-9, 0.0, 1e-12]),
    }
    for name, (rewards, gi, n, s) in cases.items():
        loss, grad, metrics = _degenerate(rewards, gi, n, s, detach=detach, floor=floor)
        assert torch.isfinite(loss), name
        assert torch.isfinite(grad).all(), name
        # |dL/ds_i| <= 2 |A_i - z_i| / (N floor) with |z| <= |s - mean| / floor tiny here: bounded by 1/floor.
        assert grad.abs().max() <= 2 * (1 + 1) / (len(rewards) * floor), name
    # At step 0 the gradient is exactly the regression of s onto floor * A: -2 A / (N (floor + eps)).
    _, grad, _ = _degenerate([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], 2, [0.0] * 4, detach=detach, floor=floor)
    expected = -2 * torch.tensor([S, -S, S, -S]) / (4 * (floor + 1e-6))
    torch.testing.assert_close(grad.view(-1), expected, rtol=1e-4, atol=1e-6)


def test_gift_without_floor_would_explode():
    """The floor is what bounds the step-0 gradient, |dL/ds_i| = 2 |A_i| / (N (floor + eps)): at a floor
    of 1e-12 only eps = 1e-6 is left, the gradient is ~7e5 (vs ~71 at 1e-2), (1e-2 + eps) / (1e-12 + eps)
    = 1.0e4 x larger."""
    _, g_floor, _ = _degenerate([1.0, 0.0], [0, 0], 1, [0.0, 0.0], floor=1e-2)
    _, g_tiny, _ = _degenerate([1.0, 0.0], [0, 0], 1, [0.0, 0.0], floor=1e-12)
    A = 0.5 / (math.sqrt(0.5) + 1e-6)  # rewards (1, 0): mean 0.5, Bessel std sqrt(0.5), advantage eps 1e-6
    for floor, grad in ((1e-2, g_floor), (1e-12, g_tiny)):
        # rtol 1e-6: measured 1.8e-8 (float32 roundings, one ulp 1.2e-7, a few on any CPU); a floor not
        # applied (or the other run's) is off by 1e4 x
        torch.testing.assert_close(grad.view(-1), torch.tensor([-A, A]) / (floor + 1e-6), rtol=1e-6, atol=0)
    # The ratio itself (was "> 1e3"): measured relative error 2.4e-8; without the floor it is 1
    ratio = float(g_tiny.abs().max() / g_floor.abs().max())
    assert ratio == pytest.approx((1e-2 + 1e-6) / (1e-12 + 1e-6), rel=1e-6), ratio


def test_gift_needs_its_baseline():
    batch, norm = _two_groups([0.1, 0.2, 0.3, 0.4])
    batch.proximal_logp_BT = None
    with pytest.raises(ValueError, match="baseline 'proximal' needs"):
        gift_loss(batch, norm, GiftOptions(baseline="proximal"))


def test_sft_loss_is_token_mean_nll():
    from gift_megatron.algo import sft_loss

    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    batch = LossBatch(logp_BT=logp, mask_BT=mask, advantages_B=torch.zeros(2), rewards_B=torch.zeros(2),
                      group_index_B=torch.tensor([0, 0]), num_groups=1)
    loss, metrics = sft_loss(batch, LossNorm(2, 3, 3))
    assert loss.item() == pytest.approx(2.0) and metrics["nll"] == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(logp.grad, -mask / 3)


def test_gift_skip_uninformative_groups_by_hand():
    """Group 0 rewards (1, 0): A = (+1/sqrt(.5)... ) z-scored; group 1 rewards (0, 0): A = 0. Implicit
    rewards s = (0.3, -0.1 | 0.2, -0.2), floor 1 (both stds below it: z = s - mean).
    Full loss: [(A0 - 0.2)^2 + (A1 + 0.2)^2 + (0 - 0.2)^2 + (0 + 0.2)^2] / 4 with A0 = -A1 = 1/sqrt(2);
    skipping: the group-1 terms vanish and their gradient is exactly zero; the divisor stays 4."""
    rewards, gi = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1])
    from gift_megatron.algo import group_advantages

    adv = group_advantages(rewards, gi, 2)
    a0 = float(adv[0])
    assert a0 == pytest.approx(2 ** -0.5, rel=1e-5)  # (1 - 0.5) / std(1, 0) with Bessel: 0.5 / 0.7071
    out = {}
    for skip in (False, True):
        logp = torch.tensor([[0.3], [-0.1], [0.2], [-0.2]], requires_grad=True)
        batch = LossBatch(logp_BT=logp, mask_BT=torch.ones(4, 1), advantages_B=adv, rewards_B=rewards,
                          group_index_B=gi, num_groups=2, ref_logp_BT=torch.zeros(4, 1))
        options = GiftOptions(implicit_std_floor=1.0, skip_uninformative_groups=skip)
        loss, _ = gift_loss(batch, LossNorm(4, 4, 1), options)
        loss.backward()
        out[skip] = (float(loss), logp.grad.flatten().tolist())
    informative = (a0 - 0.2) ** 2 + (-a0 + 0.2) ** 2
    assert out[False][0] == pytest.approx((informative + 0.04 + 0.04) / 4, rel=1e-6)
    assert out[True][0] == pytest.approx(informative / 4, rel=1e-6)
    assert out[True][1][2:] == [0.0, 0.0] and out[False][1][2] != 0.0
    assert out[True][1][:2] == pytest.approx(out[False][1][:2], rel=1e-6)


def test_truncated_is_weights_the_ppo_loss_by_hand():
    """Decoupled PPO with truncated IS: loss_t = min(pi_old / pi_behav, cap) * PPO-clip_t, the weight a
    constant. Hand-computed: ratios pi / pi_old = 1 (no clipping), advantages (+S, -S, +S, -S), engine
    log-probs making the weights (2, 0.5, 3 -> capped at 2, 1): loss = -(2 S - 0.5 S + 2 S - S) / 4."""
    behav = torch.log(torch.tensor([0.5, 2.0, 1 / 3, 1.0])).view(4, 1)
    batch, norm = _two_groups([0.0, 0.0, 0.0, 0.0])
    batch.behaviour_logp_BT = behav
    loss, metrics = ppo_clip_loss(batch, norm, **{**GRPO, "tis_cap": 2.0})
    assert loss.item() == pytest.approx(-(2 * S - 0.5 * S + 2 * S - S) / 4, abs=1e-6)
    assert metrics["tis_weight_mean"].item() == pytest.approx((2 + 0.5 + 2 + 1) / 4, abs=1e-6)
    assert metrics["tis_frac_truncated"].item() == pytest.approx(0.25)
    loss.backward()  # d/dlogp of -w A r at r = 1: -w A / 4 (the weight is not differentiated)
    assert torch.allclose(batch.logp_BT.grad.view(-1), torch.tensor([-2 * S, 0.5 * S, -2 * S, S]) / 4, atol=1e-6)
    # the weight sees pi_old, not the current policy: moving logp changes only the ratio
    batch2, _ = _two_groups([0.1, 0.0, 0.0, 0.0])
    batch2.behaviour_logp_BT = behav
    loss2, metrics2 = ppo_clip_loss(batch2, norm, **{**GRPO, "tis_cap": 2.0})
    assert metrics2["tis_weight_mean"] == metrics["tis_weight_mean"]
    assert loss2.item() == pytest.approx(-(2 * S * math.exp(0.1) - 0.5 * S + 2 * S - S) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="engine's log-probs"):
        _two_batch, _ = _two_groups([0.0] * 4)
        ppo_clip_loss(_two_batch, norm, **{**GRPO, "tis_cap": 2.0})


def test_truncated_is_is_sequence_level_for_gspo_and_a_no_op_on_policy():
    """GSPO: w_i = min(exp(mean_t log(pi_old / pi_behav)), cap) per sequence; and with the engine's
    log-probs equal to pi_old (on-policy, k = 0) every weight is 1: the losses without IS, bit for bit."""
    r = make_rollout(seed=11, old_noise=1e-3)
    logp = torch.log_softmax(r.feats_BTH @ r.weight_HV, -1).gather(-1, r.target_BT[..., None]).squeeze(-1)
    for case in ("grpo_kl", "dapo", "gspo"):
        batch = loss_batch(r, logp)
        plain, _ = build_loss(algo_cfg(case))(batch, full_norm(r))
        batch.behaviour_logp_BT = batch.proximal_logp_BT.clone()
        weighted, m = build_loss(SimpleNamespace(**{**LOSS_CASES[case], "tis_cap": 2.0}))(batch, full_norm(r))
        assert weighted.item() == plain.item() and m["tis_weight_mean"].item() == pytest.approx(1.0), case
    # sequence-level, by hand: two sequences of 2 tokens, ratio pi / pi_old = 1, log(pi_old / pi_behav) per
    # token (0.2, 0.4) -> w = exp(0.3) and (1.0, 1.0) -> e, capped at 2
    batch, norm = _two_groups([0.0] * 8, T=2)
    batch.behaviour_logp_BT = -torch.tensor([[0.2, 0.4], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    loss, metrics = gspo_loss(batch, norm, **{**GSPO, "tis_cap": 2.0})
    assert loss.item() == pytest.approx(-(S * math.exp(0.3) - S * 2.0 + S - S) / 4, abs=1e-6)
    assert metrics["tis_frac_truncated"].item() == pytest.approx(0.25)
