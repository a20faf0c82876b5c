"""Fixed vs token-budget micro-batches on long-tailed response lengths, side by side in one run.

One process, megatron-core on CPU, a 4-layer hidden-256 model. A step batch of P prompts x G
samples whose lengths follow a documented long-tailed distribution (the shape RL math responses
have: most short, a tail to the cap): prompts uniform in [16, 64) tokens, responses log-normal with
median cap/5 and sigma 0.9, clipped to [8, cap]. Each pass runs over the same samples:

* fixed: micro-batches of `--micro-batch` samples, all padded to the step's longest sequence;
* token budget: length-sorted bins of at most micro-batch x longest tokens (the same activation
  peak as the fixed micro-batch), each padded to its own longest;
* packed: the same budget as rows of several sequences (block-diagonal attention masks; the local
  attention spec computes the full row x row scores, so long rows pay quadratic attention).

Timed per algorithm, the trainer's work for one step (a single mini-batch): GRPO one forward-only
pass (old log-probs) + the update; GIFT fixed: the reference pass + the update; GIFT token budget:
the policy pass too (its whole-group statistics; the trainer reuses the step's verification pass
when there is one, not counted here). Printed: padding fraction (padded / computed positions of the
update) and the time ratio token budget / fixed, medians of `--steps` after a warm-up step.

Run: python bench/token_budget.py [--prompts 8 --group-size 8 --cap 384 --micro-batch 8 --steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gift_megatron.algo import build_group_statistics, build_loss, group_advantages
from gift_megatron.config import AlgoConfig, Config, DataConfig, ModelConfig, ParallelConfig, RolloutConfig
from gift_megatron.launch import run_distributed

VOCAB = 4096
MODES = ("fixed", "token budget", "packed")


def long_tailed_batch(prompts: int, group_size: int, cap: int, seed: int = 0):
    """Prompt-major samples with the distribution in the module docstring; 0/1 rewards, GRPO advantages."""
    from gift_megatron.batch import RolloutBatch

    n, g = prompts * group_size, torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(16, 64, (n,), generator=g)
    response_len = (cap / 5 * torch.exp(0.9 * torch.randn(n, generator=g))).round().clamp(8, cap).long()
    S = int((prompt_len + response_len).max())
    tokens = torch.randint(1, VOCAB, (n, S), generator=g)
    pos = torch.arange(S)[None]
    resp = ((pos >= prompt_len[:, None]) & (pos < (prompt_len + response_len)[:, None])).float()
    tokens = torch.where(pos < (prompt_len + response_len)[:, None], tokens, 0)
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    adv = group_advantages(rewards, torch.arange(prompts).repeat_interleave(group_size), prompts)
    return RolloutBatch(tokens, resp, rewards, adv, group_size), response_len


def _config(algo: str, prompts: int, group_size: int, micro_batch: int, max_tokens: int, cap: int,
            pack: bool = False) -> Config:
    return Config(
        model=ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
                          num_query_groups=4, kv_channels=64, vocab_size=VOCAB, make_vocab_size_divisible_by=1,
                          max_position_embeddings=cap + 64),
        parallel=ParallelConfig(micro_batch_size=micro_batch, max_tokens_per_micro_batch=max_tokens,
                                sequence_packing=pack),
        algo=AlgoConfig(name=algo, group_size=group_size, reference_refresh_every=0 if algo == "grpo" else 20),
        data=DataConfig(num_prompts_per_step=prompts, max_prompt_length=64),
        rollout=RolloutConfig(engine="vllm_server", max_new_tokens=cap), device="cpu")


def _worker(rank, world, prompts, group_size, cap, micro_batch, steps):
    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.megatron.policy import build_policy
    from gift_megatron.megatron.train_step import MicroBatching, StageLogprobs, compute_logprobs, train_mini_batch

    batch, _ = long_tailed_batch(prompts, group_size, cap)
    budget = micro_batch * batch.tokens_BS.shape[1]  # the fixed micro-batch's size in tokens
    out = {}
    for algo in ("grpo", "gift"):
        for mode in MODES:
            max_tokens = budget if mode != "fixed" else 0
            cfg = _config(algo, prompts, group_size, micro_batch, max_tokens, cap, pack=mode == "packed")
            init_model_parallel(cfg.parallel, 0, on_gpu=False)
            policy = build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=False, total_optimizer_steps=100)
            batching = MicroBatching(micro_batch, max_tokens, pack=mode == "packed")
            loss_fn, stats = build_loss(cfg.algo), build_group_statistics(cfg.algo) if max_tokens else None
            times, padding = [], float("nan")
            for _ in range(steps + 1):
                t0 = time.perf_counter()
                logp = compute_logprobs(policy.chunks, batch, batching, 1.0, VOCAB)  # proximal (GRPO) / reference
                if algo == "grpo":
                    batch.proximal_logp_BT = logp
                else:
                    batch.ref_logp_BT = logp.detach() - 0.01  # (a moved policy: any fixed offset)
                current = compute_logprobs(policy.chunks, batch, batching, 1.0, VOCAB) if stats else None
                m = train_mini_batch(policy, loss_fn, batch, batching=batching, temperature=1.0,
                                     vocab_size=VOCAB, group_statistics=stats,
                                     initial_logp=StageLogprobs(current) if stats else None)
                times.append(time.perf_counter() - t0)
                padding = m["padding_frac"]
            out[algo, mode] = {"time": statistics.median(times[1:]), "padding": padding}
    return out, budget


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--cap", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    r, budget = run_distributed(_worker, 1, a.prompts, a.group_size, a.cap, a.micro_batch, a.steps)[0]
    _, lengths = long_tailed_batch(a.prompts, a.group_size, a.cap)
    q = torch.quantile(lengths.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    print(f"{a.prompts} x {a.group_size} samples; response lengths p10/p50/p90/max {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f}/"
          f"{int(lengths.max())} (cap {a.cap}); fixed micro-batch {a.micro_batch} samples, token budget {budget}")
    print("algo | batching | padding fraction | log-prob pass(es) + update s | / fixed")
    for algo in ("grpo", "gift"):
        for mode in MODES:
            x, fixed = r[algo, mode], r[algo, "fixed"]
            print(f"{algo} | {mode} | {x['padding']:.3f} | {x['time']:.2f} | {x['time'] / fixed['time']:.2f}")


if __name__ == "__main__":
    main()
