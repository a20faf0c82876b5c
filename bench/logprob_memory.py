"""Vocab-parallel log-probs vs gathering the full logits: peak memory and time per rank.

For each TP size, TP gloo processes each hold one vocabulary shard of the logits (B*T x V/TP) and
compute log-probs of target tokens plus their backward, either
  sharded:  gift_megatron.algo.vocab_parallel_logprobs (3 x B*T numbers all-reduced), or
  gathered: all_gather the shards into full B*T x V logits, then log_softmax + gather.
Each variant runs in fresh processes; peak memory is the rise of the process's peak RSS over its
RSS once the input shard exists (ru_maxrss), time the median of several fwd+bwd passes.

Run: python bench/logprob_memory.py [--tokens 2048 --vocab 32768 --tp 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import psutil
import torch
import torch.distributed as dist

from gift_megatron.algo import vocab_parallel_logprobs
from gift_megatron.launch import run_distributed


def _gathered_logprobs(shard, target, group):
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.detach(), group=group)
    parts[dist.get_rank(group)] = shard  # keep the local shard in the graph
    full = torch.cat(parts, dim=-1)
    return torch.log_softmax(full.float(), -1).gather(-1, target[..., None]).squeeze(-1)


def _worker(rank, world, variant, tokens, vocab, repeats):
    g = torch.Generator().manual_seed(rank)
    shard = (torch.randn(1, tokens, vocab // world, generator=g) * 3).requires_grad_()
    target = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    group = dist.group.WORLD
    fn = vocab_parallel_logprobs if variant == "sharded" else _gathered_logprobs
    rss_before = psutil.Process().memory_info().rss
    times = []
    for _ in range(repeats):
        shard.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        fn(shard, target, group).sum().backward()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": (peak - rss_before) / 2**20, "seconds": statistics.median(times)}


def measure(tp: int, tokens: int, vocab: int, repeats: int = 5) -> dict[str, dict[str, float]]:
    out = {}
    for variant in ("sharded", "gathered"):
        per_rank = run_distributed(_worker, tp, variant, tokens, vocab, repeats)
        out[variant] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="B*T positions per rank")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tp", type=int, nargs="+", default=[2])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    logits_mb = a.tokens * a.vocab * 4 / 2**20
    print(f"tokens/rank={a.tokens} vocab={a.vocab}: full fp32 logits = {logits_mb:.0f} MiB")
    print("TP | sharded peak MiB | gathered peak MiB | memory ratio | sharded s | gathered s | time ratio")
    for tp in a.tp:
        m = measure(tp, a.tokens, a.vocab, a.repeats)
        s, g = m["sharded"], m["gathered"]
        print(f"{tp:2d} | {s['peak_mb']:16.0f} | {g['peak_mb']:17.0f} | {s['peak_mb'] / g['peak_mb']:12.2f} | "
              f"{s['seconds']:9.3f} | {g['seconds']:10.3f} | {s['seconds'] / g['seconds']:10.2f}")


if __name__ == "__main__":
    main()
