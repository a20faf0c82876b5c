"""What checkpoint integrity costs: the write of a full training checkpoint (model + distributed
optimizer state, megatron-core dist_checkpointing) beside the manifest step (fsync + SHA-256 of every
file, each rank its share) and the check on resume (every file re-hashed, each rank its share).

Side by side in one run, on 1 and 2 gloo ranks, for a model of `--hidden` x `--layers` (default
~50M parameters: a ~0.6 GB checkpoint in fp32 with Adam's moments). Each number is the median of
`--repeats` saves into fresh folders.

Run: python bench/checkpoint_integrity.py [--hidden 1024 --layers 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from gift_megatron.config import AlgoConfig, Config, ModelConfig, ParallelConfig, RolloutConfig
from gift_megatron.launch import run_distributed


def _config(world: int, hidden: int, layers: int) -> Config:
    return Config(
        model=ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                          num_attention_heads=hidden // 64, num_query_groups=hidden // 64, kv_channels=64,
                          vocab_size=32768, make_vocab_size_divisible_by=1, max_position_embeddings=512),
        parallel=ParallelConfig(world_size=world, tensor_model_parallel_size=world, micro_batch_size=4),
        algo=AlgoConfig(name="gift", group_size=4), rollout=RolloutConfig(engine="vllm_server"), device="cpu")


def _worker(rank, world, hidden, layers, repeats, root):
    import torch.distributed as dist

    from gift_megatron.megatron import checkpoint as ck
    from gift_megatron.megatron.parallel import init_model_parallel
    from gift_megatron.megatron.policy import build_policy

    cfg = _config(world, hidden, layers)
    init_model_parallel(cfg.parallel, 1, on_gpu=False)
    policy = build_policy(cfg.model, cfg.parallel, cfg.optim, on_gpu=False, total_optimizer_steps=10)
    rows = []
    for i in range(repeats):
        folder = Path(root) / f"r{i}"
        tmp = folder / ".tmp_step_00000001"
        if rank == 0:
            tmp.mkdir(parents=True)
        dist.barrier()
        start = time.perf_counter()
        ck.dist_checkpointing.save(ck._full_sharded_state(policy, {}, is_loading=False), str(tmp))
        dist.barrier()
        write = time.perf_counter() - start
        digest = ck.write_checkpoint_manifest(tmp)
        start = time.perf_counter()
        assert ck.checkpoint_problems(tmp) == []
        dist.barrier()
        check = time.perf_counter() - start
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        rows.append((write, digest, check, size))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"model: {args.layers} layers x hidden {args.hidden}, vocab 32768; median of {args.repeats} saves")
    print(f"{'ranks':>5} {'checkpoint':>11} {'write s':>8} {'manifest s':>11} {'check s':>8} "
          f"{'manifest/write':>15} {'check/write':>12}")
    for world in (1, 2):
        with tempfile.TemporaryDirectory(dir=".") as root:
            rows = run_distributed(_worker, world, args.hidden, args.layers, args.repeats, root)[0]
        write, digest, check = (statistics.median(r[k] for r in rows) for k in range(3))
        print(f"{world:>5} {rows[0][3] / 2**30:>9.2f} GB {write:>8.2f} {digest:>11.2f} {check:>8.2f} "
              f"{digest / write:>15.2f} {check / write:>12.2f}")


if __name__ == "__main__":
    main()
