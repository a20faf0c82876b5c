"""Rollout hot paths on CPU, each against its physical or library baseline, measured side by side:

1. Weight sync into an in-process vLLM engine (bucketed `collective_rpc` + vLLM's layerwise reload)
   vs a plain memory copy of the same bytes into preallocated tensors (the limit on one machine):
   seconds, GB/s and their ratio, for the tiny model and a ~270M-parameter Llama.
   Where a sync's time goes inside vLLM is measured by timing vLLM's own reload steps (restoring the
   layers on the meta device, materialising fresh tensors, the kernels' post-load processing, the
   copy back into the original storage); the rest is the loaders' copies and the bookkeeping.
2. Our engine's `generate` (token ids in, Completion objects with log-probs out) vs calling vLLM's
   `LLM.generate` directly with the same prompts and SamplingParams: generated tokens/s, ratio.

Each model runs in a fresh process (one vLLM engine per process). Medians of `--repeats` runs.

Run: python bench/rollout_paths.py [--models tiny medium --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # hidden, layers, ffn, heads, vocab
    "tiny": (128, 2, 512, 4, 64),
    "medium": (1024, 12, 4096, 16, 32000),
}


def _hf_model(name: str, folder: Path) -> int:
    import torch
    import transformers

    hidden, layers, ffn, heads, vocab = MODELS[name]
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                   max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class _ReloadTimers:
    """Wraps vLLM's reload steps (in-process engine: the worker runs in this process) and sums their
    seconds; restores the originals on exit."""

    def __init__(self) -> None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
        from vllm.model_executor.model_loader.reload import inplace, layerwise

        self.targets = {
            "restore on meta": (inplace, "initialize_layerwise_reload"),
            "materialise": (layerwise, "materialize_layer"),
            "post-load processing (linear)": (UnquantizedLinearMethod, "process_weights_after_loading"),
            "post-load processing (embedding)": (UnquantizedEmbeddingMethod, "process_weights_after_loading"),
            "copy back to kernel storage": (layerwise, "_copy_and_restore_kernel_tensors"),
            "finalize": (inplace, "finalize_layerwise_reload"),
        }
        self.seconds = dict.fromkeys(self.targets, 0.0)
        self.saved = {}

    def __enter__(self):
        for key, (owner, attr) in self.targets.items():
            original = getattr(owner, attr)
            self.saved[key] = original

            def timed(*args, _f=original, _k=key, **kwargs):
                t0 = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    self.seconds[_k] += time.perf_counter() - t0

            setattr(owner, attr, timed)
        return self

    def __exit__(self, *exc) -> None:
        for key, (owner, attr) in self.targets.items():
            setattr(owner, attr, self.saved[key])


def _measure(name: str, repeats: int) -> dict:
    import torch
    from safetensors.torch import load_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from gift_megatron.config import RolloutConfig
    from gift_megatron.rollout.engine import LocalEngine

    folder = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    params = _hf_model(name, folder)
    tensors = sorted(load_file(str(folder / "model.safetensors")).items())
    nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
    rollout = RolloutConfig(max_new_tokens=16, cpu_kvcache_space_gib=2)
    engine = LocalEngine(folder, rollout, seed=0, max_model_len=256)

    sync, copy = [], []
    dst = [torch.empty_like(t) for _, t in tensors]
    for _ in range(repeats):
        sync.append(engine.load_weights(iter(tensors)).seconds)
        t0 = time.perf_counter()
        for d, (_, t) in zip(dst, tensors):
            d.copy_(t)
        copy.append(time.perf_counter() - t0)
    with _ReloadTimers() as timers:
        breakdown_total = engine.load_weights(iter(tensors)).seconds
    breakdown = dict(timers.seconds, total=breakdown_total)

    vocab = MODELS[name][4]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (12,), generator=g).tolist() for _ in range(64)]
    n = 8
    ours, direct = [], []
    sp = SamplingParams(n=n, max_tokens=16, temperature=1.0, top_p=1.0, logprobs=0, detokenize=False, seed=7)
    for _ in range(repeats):
        t0 = time.perf_counter()
        groups = engine.generate(prompts, n, seed=7)
        t1 = time.perf_counter()
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        t2 = time.perf_counter()
        ours.append(sum(len(c.token_ids) for g_ in groups for c in g_) / (t1 - t0))
        direct.append(sum(len(o.token_ids) for out in outs for o in out.outputs) / (t2 - t1))
    engine.close()
    med = statistics.median
    return {"params": params, "bytes": nbytes, "sync_s": med(sync), "copy_s": med(copy),
            "ours_tok_s": med(ours), "direct_tok_s": med(direct), "breakdown": breakdown}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # the child process: one engine, results as JSON on the last line
        print(json.dumps(_measure(a.one, a.repeats)))
        return
    rows = {}
    for name in a.models:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(a.repeats)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            sys.exit(f"{name}: {proc.stderr[-3000:]}")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("model | params | MB | sync s | sync GB/s | memcpy s | memcpy GB/s | sync/memcpy time")
    for name, r in rows.items():
        gb = r["bytes"] / 1e9
        print(f"{name} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 1e6:.0f} | {r['sync_s']:.3f} | "
              f"{gb / r['sync_s']:.2f} | {r['copy_s']:.4f} | {gb / r['copy_s']:.2f} | {r['sync_s'] / r['copy_s']:.1f}")
    print("model | where one sync's seconds go (vLLM's reload steps; the rest: loaders' copies, bookkeeping, RPC)")
    for name, r in rows.items():
        b = dict(r["breakdown"])
        total = b.pop("total")
        parts = [f"{k} {v:.3f} s ({v / total:.0%})" for k, v in b.items()]
        rest = total - sum(b.values())
        print(f"{name} | total {total:.3f} s | " + " | ".join(parts) + f" | rest {rest:.3f} s ({rest / total:.0%})")
    print("model | ours tokens/s | vLLM direct tokens/s | ours/direct")
    for name, r in rows.items():
        print(f"{name} | {r['ours_tok_s']:.0f} | {r['direct_tok_s']:.0f} | {r['ours_tok_s'] / r['direct_tok_s']:.2f}")


if __name__ == "__main__":
    main()
