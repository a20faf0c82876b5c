"""Step-time model of a synchronous GIFT step at cluster scale (docs/scaling.md), from the model
preset and the layout: a model, not a measurement. Every assumed hardware rate is a flag.

Per step: generation on the rollout GPUs (decode is bound by HBM bandwidth: each iteration reads the
server's weights and the KV cache of every running sequence), then the trainer's passes on the
trainer GPUs (reference + rollout-policy log-probs forward, policy forward + backward: 10 N T FLOPs
plus attention), then the weight sync. Throughput is reported as NeMo-RL reports it: tokens of the
step's samples (prompt + response) / step time / all GPUs of the job.

Run: python bench/scaling_model.py [--mfu 0.4 --hbm-efficiency 0.6 --sync-gbps 20]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class Gpu:
    name: str
    bf16_tflops: float  # dense peak
    hbm_tb_s: float
    memory_gb: float


H100 = Gpu("H100 SXM", 989.0, 3.35, 80.0)
H200 = Gpu("H200 SXM", 989.0, 4.8, 141.0)


@dataclass
class Workload:
    name: str
    samples: int  # prompts x G
    prompt_tokens: int
    response_tokens: float  # mean
    max_response: int


def model_shape(preset: str) -> dict:
    m = OmegaConf.load(CONF / "model" / f"{preset}.yaml")
    h, f, L = m.hidden_size, m.ffn_hidden_size, m.num_layers
    q, kv, d = m.num_attention_heads, m.num_query_groups, m.kv_channels
    layer = h * q * d + 2 * h * kv * d + q * d * h + 3 * h * f  # QKV, output projection, gated MLP
    embed = m.vocab_size * h
    params = L * layer + embed * (2 if m.untie_embeddings_and_output_weights else 1)
    return {"params": params, "matmul_params": L * layer + embed, "layers": L, "q_dim": q * d,
            "kv_bytes_per_token": 2 * L * kv * d * 2}  # K and V, bf16


def step_time(shape: dict, work: Workload, gpu: Gpu, train_gpus: int, servers: int, server_tp: int,
              mfu: float, hbm_eff: float, sync_gbps: float, max_num_seqs: int) -> dict:
    T = work.samples * (work.prompt_tokens + work.response_tokens)
    ctx = work.prompt_tokens + work.response_tokens
    attn_fwd_per_token = 4 * shape["layers"] * shape["q_dim"] * ctx / 2  # QK^T and AV, causal
    fwd_per_token = 2 * shape["matmul_params"] + attn_fwd_per_token
    train_flops = T * (3 * fwd_per_token + 2 * fwd_per_token)  # fwd+bwd, reference and rollout-policy fwd
    t_train = train_flops / (train_gpus * gpu.bf16_tflops * 1e12 * mfu)

    weights_per_gpu = shape["params"] * 2 / server_tp
    kv_space = server_tp * (0.9 * gpu.memory_gb * 1e9 - weights_per_gpu - 4e9)  # 4 GB workspace per GPU
    full_seq = work.prompt_tokens + work.max_response
    running = min(max_num_seqs, int(kv_space / (shape["kv_bytes_per_token"] * full_seq)))
    mean_ctx = work.prompt_tokens + work.response_tokens / 2
    bytes_per_iter = weights_per_gpu + running * mean_ctx * shape["kv_bytes_per_token"] / server_tp
    iter_s = bytes_per_iter / (gpu.hbm_tb_s * 1e12 * hbm_eff)
    server_tok_s = running / iter_s
    t_gen = work.samples * work.response_tokens / (servers * server_tok_s)

    t_sync = shape["params"] * 2 / (sync_gbps * 1e9)
    step = t_gen + t_train + t_sync
    gpus = train_gpus + servers * server_tp
    return {"tokens": T, "running": running, "server_tok_s": server_tok_s, "gen_s": t_gen, "train_s": t_train,
            "sync_s": t_sync, "step_s": step, "tok_s_gpu": T / step / gpus, "gpus": gpus}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5_32b")
    ap.add_argument("--mfu", type=float, default=0.40, help="trainer model-FLOPs utilisation (BF16 peak)")
    ap.add_argument("--hbm-efficiency", type=float, default=0.6, help="fraction of HBM bandwidth decode reaches")
    ap.add_argument("--sync-gbps", type=float, default=20.0, help="effective GB/s of the NCCL weight broadcast")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's running-sequence cap per server")
    a = ap.parse_args()
    shape = model_shape(a.preset)
    print(f"{a.preset}: {shape['params'] / 1e9:.2f} B parameters, KV {shape['kv_bytes_per_token'] / 1e3:.0f} kB "
          f"per token; MFU {a.mfu}, HBM efficiency {a.hbm_efficiency}, sync {a.sync_gbps} GB/s")
    workloads = [
        # NeMo-RL v0.4's Qwen3-32B GRPO row: 2048 samples, 4096 max, 3206 mean prompt+response tokens
        Workload("NeMo-RL 32B workload", 2048, 300, 2906, 4096),
        Workload("ours: 512 x 16, R=2048", 8192, 300, 2048, 8192),
        Workload("ours: 512 x 16, R=4096", 8192, 300, 4096, 8192),
    ]
    print("workload | GPU | GPUs (train + rollout) | running seqs/server | gen tok/s/server | generate s | "
          "train s | sync s | step s | tokens/s/GPU")
    for gpu in (H100, H200):
        for w in workloads:
            r = step_time(shape, w, gpu, train_gpus=32, servers=4, server_tp=4, mfu=a.mfu, hbm_eff=a.hbm_efficiency,
                          sync_gbps=a.sync_gbps, max_num_seqs=a.max_num_seqs)
            print(f"{w.name} | {gpu.name} | {r['gpus']} (32 + 16) | {r['running']} | {r['server_tok_s']:.0f} | "
                  f"{r['gen_s']:.0f} | {r['train_s']:.0f} | {r['sync_s']:.1f} | {r['step_s']:.0f} | "
                  f"{r['tok_s_gpu']:.0f}")


if __name__ == "__main__":
    main()
