"""Step time of one GIFT train step (megatron-core on gloo) at each parallel layout, side by side.

A 4-layer, hidden-256 Llama-style model (4 heads of 64), P prompts x G samples of S tokens, AdamW
through megatron's distributed optimizer; the same step batch laid out as docs/design.md says. Each layout
runs in fresh processes: 1 warm-up step, then the median of `--steps` steps. On a 2-core CPU machine,
layouts with 2 processes share the cores and pay gloo's copies: the ratios say what the
communication costs here, not what it costs on GPUs with NCCL.

Run: python bench/train_step_layouts.py [--prompts 4 --group-size 4 --seq 128 --steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from gift_megatron.algo import build_loss, group_advantages
from gift_megatron.algo.layout import dp_sample_indices
from gift_megatron.config import AlgoConfig, Config, DataConfig, ModelConfig, ParallelConfig, RolloutConfig
from gift_megatron.launch import run_distributed

VOCAB = 4096
LAYOUTS = {  # name: (world, TP, PP, virtual PP, micro-batches)
    "TP1 PP1 DP1": (1, 1, 1, None, 1),
    "TP1 PP1 DP1, 4 micro-batches": (1, 1, 1, None, 4),
    "TP2": (2, 2, 1, None, 1),
    "PP2 (1F1B, 2 micro-batches)": (2, 1, 2, None, 2),
    "PP2 x VPP2 (interleaved, 4 mb)": (2, 1, 2, 2, 4),
    "DP2": (2, 1, 1, None, 1),
}


def _config(world, tp, pp, vpp, nmb, prompts, group_size, algo="gift") -> Config:
    dp = world // (tp * pp)
    return Config(
        model=ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4,
                          num_query_groups=4, kv_channels=64, vocab_size=VOCAB, make_vocab_size_divisible_by=1,
                          max_position_embeddings=512),
        parallel=ParallelConfig(world_size=world, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                virtual_pipeline_model_parallel_size=vpp,
                                micro_batch_size=prompts * group_size // dp // nmb),
        algo=AlgoConfig(name=algo, group_size=group_size), data=DataConfig(num_prompts_per_step=prompts),
        rollout=RolloutConfig(engine="vllm_server"), device="cpu")


def synthetic_batch(prompts: int, group_size: int, seq: int):
    """P x G random sequences (the last 3/4 of each is the response) with 0/1 rewards and GRPO advantages."""
    from gift_megatron.batch import RolloutBatch

    n = prompts * group_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (n, seq), generator=g)
    resp = (torch.arange(seq)[None] >= seq // 4).float().expand(n, -1)
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    adv = group_advantages(rewards, torch.arange(prompts).repeat_interleave(group_size), prompts)
    return RolloutBatch(tokens, resp, rewards, adv, group_size)


def _worker(rank, world, tp, pp, vpp, nmb, prompts, group_size, seq, steps):
    from megatron.core import parallel_state as ps

    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.megatron.policy import build_policy
    from gift_megatron.megatron.train_step import MicroBatching, train_mini_batch

    cfg = _config(world, tp, pp, vpp, nmb, prompts, group_size)
    init_model_parallel(cfg.parallel, 0, on_gpu=False)
    policy = build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=False, total_optimizer_steps=100)
    batch = synthetic_batch(prompts, group_size, seq)
    g = torch.Generator().manual_seed(1)
    batch.ref_logp_BT = torch.randn(batch.tokens_BS.shape[0], seq - 1, generator=g) * 0.1 - 8.0
    dp = cfg.parallel.data_parallel_size
    batch = replace(batch.select(dp_sample_indices(prompts, group_size, ps.get_data_parallel_rank(), dp)),
                    samples_per_prompt=group_size // dp)
    loss_fn = build_loss(cfg.algo)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        train_mini_batch(policy, loss_fn, batch, batching=MicroBatching(cfg.parallel.micro_batch_size),
                         temperature=1.0, vocab_size=VOCAB)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    print(f"{a.prompts} prompts x {a.group_size} samples x {a.seq} tokens, 4 layers, hidden 256, vocab {VOCAB}")
    print("layout | step seconds | vs TP1 PP1 DP1")
    base = None
    for name, (world, tp, pp, vpp, nmb) in LAYOUTS.items():
        t = max(run_distributed(_worker, world, tp, pp, vpp, nmb, a.prompts, a.group_size, a.seq, a.steps))
        base = base or t
        print(f"{name} | {t:.3f} | {t / base:.2f}")


if __name__ == "__main__":
    main()
