"""GIFT's theorem on a tabular bandit: the minimiser is pi* proportional to pi_ref exp(r / beta(x)).

For M prompts with K actions each, a tabular softmax policy is trained with the real `gift_loss`
on sampled groups of G actions (Adam, learning rate decayed to 0). The paper's theorem says the
population minimisers satisfy log pi - log pi_ref = r / beta(x) + c(x) with beta(x) = std_r / std_s,
both stds under pi. We measure, per prompt, the total-variation distance between the learned pi and
pi* built from pi's own beta(x), and compare it with how far pi moved from pi_ref.

Run: python bench/tabular_theory.py [--prompts 8 --actions 6 --group-size 64 --steps 3000]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from tqdm import trange

from gift_megatron.algo import GiftOptions, LossBatch, LossNorm, gift_loss, group_advantages


@dataclass
class BanditResult:
    tv_to_theory: torch.Tensor  # per prompt: TV(pi, pi*(beta(x)))
    tv_from_ref: torch.Tensor  # per prompt: TV(pi, pi_ref), how far training moved
    beta: torch.Tensor
    reward_ref: float  # expected reward under pi_ref, averaged over prompts
    reward_final: float


def _population_beta(pi, logp, ref_logp, rewards):
    """beta(x) = std_pi(r) / std_pi(s), s = log pi - log pi_ref (ratio of population stds)."""
    s = logp - ref_logp
    var = lambda x: (pi * (x - (pi * x).sum(-1, keepdim=True)) ** 2).sum(-1)  # noqa: E731
    return (var(rewards) / var(s)).sqrt()


def run_bandit(num_prompts=8, num_actions=6, group_size=64, steps=3000, lr=0.05, seed=0,
               implicit_std_floor=1e-2, progress=False) -> BanditResult:
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(num_prompts, num_actions, generator=g)
    rewards = torch.rand(num_prompts, num_actions, generator=g)
    ref_logp = torch.log_softmax(ref_logits, -1)
    theta = ref_logits.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    group_index = torch.arange(num_prompts).repeat_interleave(group_size)
    norm = LossNorm(num_samples=num_prompts * group_size, num_tokens=num_prompts * group_size, max_response_length=1)
    for _ in trange(steps, disable=not progress, desc="GIFT on a tabular bandit"):
        logp_all = torch.log_softmax(theta, -1)
        actions = torch.multinomial(logp_all.detach().exp(), group_size, replacement=True, generator=g)
        r = rewards.gather(1, actions).view(-1)
        batch = LossBatch(
            logp_BT=logp_all.gather(1, actions).view(-1, 1), mask_BT=torch.ones(r.numel(), 1),
            advantages_B=group_advantages(r, group_index, num_prompts), rewards_B=r,
            group_index_B=group_index, num_groups=num_prompts, ref_logp_BT=ref_logp.gather(1, actions).view(-1, 1),
        )
        loss, _ = gift_loss(batch, norm, GiftOptions(implicit_std_floor=implicit_std_floor))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        logp = torch.log_softmax(theta, -1)
        pi = logp.exp()
        beta = _population_beta(pi, logp, ref_logp, rewards)
        pi_star = torch.softmax(ref_logp + rewards / beta[:, None], -1)
        ref_pi = ref_logp.exp()
        return BanditResult(
            tv_to_theory=0.5 * (pi - pi_star).abs().sum(-1), tv_from_ref=0.5 * (pi - ref_pi).abs().sum(-1),
            beta=beta, reward_ref=float((ref_pi * rewards).sum(-1).mean()),
            reward_final=float((pi * rewards).sum(-1).mean()),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--actions", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    res = run_bandit(a.prompts, a.actions, a.group_size, a.steps, a.lr, a.seed, progress=True)
    print("\nprompt | beta(x) | TV(pi, pi_ref) | TV(pi, pi_ref*exp(r/beta)/Z)")
    for i in range(len(res.beta)):
        print(f"{i:6d} | {res.beta[i]:7.4f} | {res.tv_from_ref[i]:14.4f} | {res.tv_to_theory[i]:.2e}")
    print(f"max TV to the theorem's form: {res.tv_to_theory.max():.2e} "
          f"(pi moved {res.tv_from_ref.mean():.3f} TV from pi_ref on average)")
    print(f"expected reward: pi_ref {res.reward_ref:.4f} -> pi {res.reward_final:.4f}")


if __name__ == "__main__":
    main()
