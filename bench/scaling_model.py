"""Step-time model of a GIFT step at cluster scale (docs/scaling.md), from the model preset and the
layout: a model, not a measurement. Every assumed hardware rate is a flag.

Synchronous step (rollout.max_staleness=0): generation on the rollout GPUs (decode is bound by HBM
bandwidth: each iteration reads the server's weights and the KV cache of every running sequence),
then the trainer's passes on the trainer GPUs (reference + rollout-policy log-probs forward, policy
forward + backward: 10 N T FLOPs plus attention), then the weight sync.

Overlapped step (rollout.max_staleness=1): batch n+1 is generated with the engine's weights while
batch n trains; the sync lands between generation rounds, so the generator waits for it and the step
is max(generate, trainer passes) + sync. GIFT (reference baseline) runs the rollout-policy pass only on
the steps it verifies (every --verify-every): there the trainer waits for the batch generated with its
current weights and runs one extra forward on it, and its update cannot overlap generation; the mean
step adds 1/N of that difference. GRPO-style losses need the rollout-policy pass (proximal policy) on
every step.

Throughput is reported as NeMo-RL reports it: tokens of the step's samples (prompt + response) / step
time / all GPUs of the job.

Run: python bench/scaling_model.py [--mfu 0.4 --hbm-efficiency 0.6 --sync-gbps 20 --verify-every 10]
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
    return {"params": params, "matmul_params": L * layer + embed, "embed": embed, "layers": L, "q_dim": q * d,
            "kv_bytes_per_token": 2 * L * kv * d * 2}  # K and V, bf16


def step_time(shape: dict, work: Workload, gpu: Gpu, train_gpus: int, servers: int, server_tp: int,
              mfu: float, hbm_eff: float, sync_gbps: float, max_num_seqs: int) -> dict:
    T = work.samples * (work.prompt_tokens + work.response_tokens)
    ctx = work.prompt_tokens + work.response_tokens
    attn_fwd_per_token = 4 * shape["layers"] * shape["q_dim"] * ctx / 2  # QK^T and AV, causal
    fwd_per_token = 2 * shape["matmul_params"] + attn_fwd_per_token
    t_fwd = T * fwd_per_token / (train_gpus * gpu.bf16_tflops * 1e12 * mfu)  # one forward pass over the batch
    t_train = 5 * t_fwd  # fwd+bwd (3), reference and rollout-policy fwd (1 each)

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
            "fwd_s": t_fwd, "sync_s": t_sync, "step_s": step, "tok_s_gpu": T / step / gpus, "gpus": gpus}


def overlapped_step(r: dict, verify_every: int, rollout_policy_every_step: bool) -> dict:
    """Mean step at rollout.max_staleness=1 in steady state (the first step, generated before any training,
    is left out). Trainer passes: reference fwd, policy fwd + bwd (3 forwards), and for GRPO-style losses
    the rollout-policy fwd (counted with the reference, i.e. with a KL term: conservative for GRPO without
    one). An unverified step is max(generate, passes) + sync. A verified step (every verify_every; 0:
    never) cannot overlap its update: before it, the trainer waits for the batch generated with its current
    weights and runs one more forward on it, so it is max(generate, forwards before the update) + that
    forward + the update (fwd + bwd) + sync."""
    before_update = r["fwd_s"] * (2 if rollout_policy_every_step else 1)
    update = 3 * r["fwd_s"]
    passes = before_update + update
    unverified = max(r["gen_s"], passes) + r["sync_s"]
    verified = max(r["gen_s"], before_update) + r["fwd_s"] + update + r["sync_s"]
    step = unverified + (verified - unverified) / verify_every if verify_every else unverified
    return {"passes_s": passes, "verify_s": step - unverified, "step_s": step,
            "tok_s_gpu": r["tokens"] / step / r["gpus"]}


def trainer_gb(shape: dict, tp: int, pp: int, dp: int) -> float:
    """Fullest trainer stage per GPU as in docs/sizing_32b.md: bf16 weights, FP8 copies, fp32 grads, frozen
    reference (2 + 1 + 4 + 2 B per parameter), distributed optimizer 12 B / DP, plus that page's activations
    (model.recompute=full) and last-stage logits at 73.7 k-token micro-batches and TP = 8: 7.6 + 11.2 GB."""
    layers = shape["matmul_params"] - shape["embed"]
    embeds = shape["params"] - layers  # embedding and output layer; one stage holds both when PP = 1
    per_gpu = (layers / pp + (embeds if pp == 1 else shape["embed"])) / tp
    return (per_gpu * (2 + 1 + 4 + 2 + 12 / dp) + 18.8e9) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5_32b")
    ap.add_argument("--mfu", type=float, default=0.40, help="trainer model-FLOPs utilisation (BF16 peak)")
    ap.add_argument("--hbm-efficiency", type=float, default=0.6, help="fraction of HBM bandwidth decode reaches")
    ap.add_argument("--sync-gbps", type=float, default=20.0, help="effective GB/s of the NCCL weight broadcast")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="vLLM's running-sequence cap per server")
    ap.add_argument("--verify-every", type=int, default=10, help="rollout.verify_every at k=1 (0: never)")
    ap.add_argument("--nemo-rl-tok-s-gpu", type=float, default=540.0, help="NeMo-RL's best published 32B row")
    ap.add_argument("--target-ratio", type=float, default=1.3, help="goal, as a multiple of that row")
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
    print_overlapped(shape, workloads, a)


# Trainer layouts of the 6-node job: TP8 x PP x DP with PP dividing the 64 layers and DP dividing G = 16, so
# 24 and 40 trainer GPUs have none; 8 (TP8 PP1 DP1) needs ~105 GB per GPU (trainer_gb) and quarters the
# trainer. The remaining GPUs serve as TP = 4 vLLM servers.
SPLITS = [(32, 2, 2), (16, 2, 1)]  # (trainer GPUs, PP, DP)


def print_overlapped(shape: dict, workloads: list[Workload], a: argparse.Namespace) -> None:
    print(f"\nrollout.max_staleness=1, GIFT with rollout.verify_every={a.verify_every}; GRPO-style: rollout-policy "
          f"pass every step. x sync: against the synchronous step of the same layout.")
    print("workload | GPU | trainer layout + rollout | trainer GB/GPU | generate s | trainer passes s | "
          "verify s/step | sync s | step s | tokens/s/GPU | x sync | GRPO-style step s | GRPO-style tokens/s/GPU")
    for gpu in (H100, H200):
        for w in workloads:
            for train_gpus, pp, dp in SPLITS:
                servers = (48 - train_gpus) // 4
                r = step_time(shape, w, gpu, train_gpus=train_gpus, servers=servers, server_tp=4, mfu=a.mfu,
                              hbm_eff=a.hbm_efficiency, sync_gbps=a.sync_gbps, max_num_seqs=a.max_num_seqs)
                o = overlapped_step(r, a.verify_every, rollout_policy_every_step=False)
                g = overlapped_step(r, a.verify_every, rollout_policy_every_step=True)
                mem = trainer_gb(shape, 8, pp, dp)
                fits = "fits" if mem < 0.9 * gpu.memory_gb else "does not fit"
                print(f"{w.name} | {gpu.name} | TP8 PP{pp} DP{dp} ({train_gpus}) + {servers} x TP4 | {mem:.0f} "
                      f"({fits}) | {r['gen_s']:.0f} | {o['passes_s']:.0f} | {o['verify_s']:.1f} | "
                      f"{r['sync_s']:.1f} | {o['step_s']:.0f} | {o['tok_s_gpu']:.0f} | "
                      f"{r['step_s'] / o['step_s']:.2f} | {g['step_s']:.0f} | {g['tok_s_gpu']:.0f}")
    nemo = workloads[0]
    target = a.target_ratio * a.nemo_rl_tok_s_gpu
    print(f"\n{nemo.name}, TP8 PP2 DP2 (32) + 4 x TP4: generation may take this many times the model's "
          f"(lower-bound) time before GIFT at k=1 falls below {a.target_ratio} x {a.nemo_rl_tok_s_gpu:.0f} = "
          f"{target:.0f} tokens/s/GPU")
    for gpu in (H100, H200):
        r = step_time(shape, nemo, gpu, train_gpus=32, servers=4, server_tp=4, mfu=a.mfu, hbm_eff=a.hbm_efficiency,
                      sync_gbps=a.sync_gbps, max_num_seqs=a.max_num_seqs)
        o = overlapped_step(r, a.verify_every, rollout_policy_every_step=False)
        max_step = r["tokens"] / target / r["gpus"]
        if o["passes_s"] + o["verify_s"] + r["sync_s"] > max_step:
            print(f"{gpu.name}: the trainer's side alone ({o['passes_s']:.0f} s) exceeds the {max_step:.0f} s step")
            continue
        print(f"{gpu.name}: step may reach {max_step:.0f} s; generation may reach "
              f"{max_step - o['verify_s'] - r['sync_s']:.0f} s = "
              f"{(max_step - o['verify_s'] - r['sync_s']) / r['gen_s']:.2f} x the modelled {r['gen_s']:.0f} s "
              f"(trainer passes {o['passes_s']:.0f} s)")


if __name__ == "__main__":
    main()
