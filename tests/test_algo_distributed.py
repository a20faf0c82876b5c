"""The algorithm on real gloo process groups: sharded log-probs and DP/micro-batch invariance.

Each test spawns 2 or 4 processes. The single-process result is the reference; tolerances are
float32 round-off (the reductions run in a different order).
"""

import pytest
import torch
import torch.distributed as dist

from gift_megatron.algo import build_loss, global_norm, vocab_parallel_entropy, vocab_parallel_logprobs
from gift_megatron.launch import run_distributed
from tests.toy import LOSS_CASES, algo_cfg, loss_batch, make_rollout


def _logits_data(V=48):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 5, V, generator=g) * 3
    return logits, torch.randint(0, V, (3, 5), generator=g), torch.randn(3, 5, generator=g)


def _tp_worker(rank, world, pad):
    logits, target, w = _logits_data()
    logits = torch.cat([logits, torch.full((*logits.shape[:-1], pad), 7.0)], -1)  # Megatron's TP padding
    shard = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    group = dist.group.WORLD
    logp = vocab_parallel_logprobs(shard, target, group, temperature=0.9, vocab_size=48)
    ent = vocab_parallel_entropy(shard, group, temperature=0.9, vocab_size=48)
    ((logp + 0.3 * ent) * w).sum().backward()
    return {"logp": logp.detach(), "entropy": ent.detach(), "grad": shard.grad}


@pytest.mark.parametrize("tp,pad", [(2, 0), (4, 0), (2, 8)])
def test_vocab_parallel_logprobs_equal_unsharded(tp, pad):
    results = run_distributed(_tp_worker, tp, pad)
    logits, target, w = _logits_data()
    full = logits.clone().requires_grad_()
    logp = torch.log_softmax(full / 0.9, -1)
    ent = -(logp.exp() * logp).sum(-1)
    logp_t = logp.gather(-1, target[..., None]).squeeze(-1)
    ((logp_t + 0.3 * ent) * w).sum().backward()
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["logp"], logp_t.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(res["entropy"], ent.detach(), rtol=1e-5, atol=1e-5)
        padded_grad = torch.cat([full.grad, torch.zeros(*full.grad.shape[:-1], pad)], -1)
        torch.testing.assert_close(res["grad"], padded_grad.chunk(tp, -1)[rank], rtol=1e-5, atol=1e-6)


def _policy_loss(case, r, weight_HV, idx, group_index, num_groups, norm, tp_group, dp_group, old_noise):
    logits = r.feats_BTH[idx] @ weight_HV
    logp = vocab_parallel_logprobs(logits, r.target_BT[idx], tp_group)
    batch = loss_batch(r, logp, idx=idx, group_index_B=group_index, num_groups=num_groups, dp_group=dp_group)
    return build_loss(algo_cfg(case))(batch, norm, dp_group=dp_group)[0]


def _rollout(case):
    return make_rollout(P=4, G=4, seed=7, old_noise=1e-3 if case == "gspo" else 0.3)


def _split_worker(rank, world, tp):
    """Every loss case, with DP = world / tp ranks (G/DP samples of every prompt each) x 2 micro-batches."""
    dp = world // tp
    tp_groups = [dist.new_group(list(range(d * tp, (d + 1) * tp))) for d in range(dp)]
    dp_groups = [dist.new_group(list(range(t, world, tp))) for t in range(tp)]
    tp_rank, dp_rank = rank % tp, rank // tp
    return {case: _split_case(case, tp, tp_rank, dp, dp_rank, tp_groups[dp_rank], dp_groups[tp_rank])
            for case in LOSS_CASES}


def _split_case(case, tp, tp_rank, dp, dp_rank, tp_group, dp_group):
    r = _rollout(case)
    P, G = r.num_groups, r.mask_BT.shape[0] // r.num_groups
    per_rank = G // dp
    weight = r.weight_HV.chunk(tp, dim=-1)[tp_rank].clone().requires_grad_()
    mine = torch.tensor([p * G + dp_rank * per_rank + j for p in range(P) for j in range(per_rank)])
    norm = global_norm(r.mask_BT[mine], r.mask_BT.shape[1], dp_group)
    total = torch.zeros(())
    for prompts in (torch.tensor([0, 1]), torch.tensor([2, 3])):  # micro-batches
        idx = torch.tensor([p * G + dp_rank * per_rank + j for p in prompts.tolist() for j in range(per_rank)])
        local_group = (r.group_index_B[idx] - prompts[0]).long()
        loss = _policy_loss(case, r, weight, idx, local_group, len(prompts), norm, tp_group, dp_group, None)
        loss.backward()
        total += loss.detach()
    dist.all_reduce(weight.grad, group=dp_group)
    dist.all_reduce(total, group=dp_group)
    return {"loss": total, "grad": weight.grad}


@pytest.fixture(scope="module", params=[1, 2], ids=["dp2", "tp2xdp2"])
def split_results(request):
    tp = request.param
    return tp, run_distributed(_split_worker, 2 * tp, tp)  # DP = 2 on 2 processes; TP = 2 x DP = 2 on 4


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_loss_and_grads_invariant_to_dp_and_microbatch_split(case, split_results):
    """Tolerance: float32 round-off of differently ordered reductions, relative to the largest gradient."""
    tp, all_results = split_results
    results = [res[case] for res in all_results]
    r = _rollout(case)
    weight = r.weight_HV.clone().requires_grad_()
    all_idx = torch.arange(r.mask_BT.shape[0])
    norm = global_norm(r.mask_BT, r.mask_BT.shape[1])
    loss = _policy_loss(case, r, weight, all_idx, r.group_index_B, r.num_groups, norm, None, None, None)
    loss.backward()
    assert weight.grad.abs().max() > 1e-4
    for rank, res in enumerate(results):
        assert res["loss"].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(res["grad"], weight.grad.chunk(tp, -1)[rank % tp], rtol=1e-4,
                                   atol=1e-4 * weight.grad.abs().max().item())
