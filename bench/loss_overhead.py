"""GIFT's step vs GRPO's on the same model and batch (one process, megatron-core, CPU).

Per rollout batch, each algorithm needs one forward-only log-prob pass besides its training step:
GRPO (PPO-clip, no KL) the rollout policy's log-probs for the ratio, GIFT the frozen reference's for
the implicit reward. GIFT's loss itself (two per-prompt z-scores and an MSE) should cost no more
than GRPO's (ratios, clipping); the whole iteration should cost about the same. Printed: the median
of `--steps` measurements after a warm-up, and the ratios.

Run: python bench/loss_overhead.py [--prompts 8 --group-size 8 --seq 128 --steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from train_step_layouts import VOCAB, _config, synthetic_batch

from gift_megatron.algo import build_loss
from gift_megatron.launch import run_distributed


def _worker(rank, world, prompts, group_size, seq, steps):
    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.megatron.policy import build_policy
    from gift_megatron.megatron.train_step import MicroBatching, compute_logprobs, train_mini_batch

    out = {}
    for algo in ("grpo", "gift"):
        cfg = _config(1, 1, 1, None, 1, prompts, group_size, algo=algo)
        init_model_parallel(cfg.parallel, 0, on_gpu=False)
        policy = build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=False, total_optimizer_steps=100)
        batch = synthetic_batch(prompts, group_size, seq)
        g = torch.Generator().manual_seed(1)
        mb = MicroBatching(cfg.parallel.micro_batch_size)
        passes, trains = [], []
        loss_fn = build_loss(cfg.algo)
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            logp = compute_logprobs(policy.chunks, batch, mb, 1.0, VOCAB)  # proximal (GRPO) or reference (GIFT)
            t1 = time.perf_counter()
            if algo == "grpo":
                batch.proximal_logp_BT = logp
            else:
                batch.ref_logp_BT = logp - 0.01 * torch.randn(logp.shape, generator=g)  # a moved policy
            train_mini_batch(policy, loss_fn, batch, batching=mb, temperature=1.0, vocab_size=VOCAB)
            t2 = time.perf_counter()
            passes.append(t1 - t0)
            trains.append(t2 - t1)
        out[algo] = {"pass": statistics.median(passes[1:]), "train": statistics.median(trains[1:])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    r = run_distributed(_worker, 1, a.prompts, a.group_size, a.seq, a.steps)[0]
    g, p = r["gift"], r["grpo"]
    print(f"{a.prompts} prompts x {a.group_size} samples x {a.seq} tokens, 4 layers, hidden 256, vocab {VOCAB}")
    print("algo | log-prob pass s | train step s | iteration s")
    for name, x in (("GRPO (old log-probs)", p), ("GIFT (reference log-probs)", g)):
        print(f"{name} | {x['pass']:.3f} | {x['train']:.3f} | {x['pass'] + x['train']:.3f}")
    print(f"GIFT / GRPO: train step {g['train'] / p['train']:.2f}, iteration "
          f"{(g['pass'] + g['train']) / (p['pass'] + p['train']):.2f}; GIFT's extra train time / one log-prob pass: "
          f"{(g['train'] - p['train']) / g['pass']:+.2f}")


if __name__ == "__main__":
    main()
