"""Hugging Face config.json <-> our ModelConfig, for the three supported families."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gift_megatron.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_ARCH = {v: k for k, v in ARCHITECTURES.items()}
# megatron-core's RoPE scaling implements Llama 3.1's rule with these constants (rotary_pos_embedding.py)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _unsupported(path: Path, what: str, fix: str) -> ValueError:
    return ValueError(f"{path}: {what} is not supported: {fix}")


def _rope(hf: dict[str, Any], path: Path) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params if params.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise _unsupported(path, f"rope scaling type {kind!r}", "only Llama 3.1's 'llama3' scaling is implemented")
        for key, want in LLAMA3_ROPE.items():
            if float(scaling.get(key, want)) != want:
                raise _unsupported(path, f"llama3 rope scaling with {key}={scaling[key]}",
                                   f"megatron-core implements {key}={want}")
    return theta, scaling


def model_config_from_hf(folder: str | Path, **overrides: Any) -> ModelConfig:
    """config.json of a Llama / Qwen2 / Qwen3 checkpoint -> ModelConfig (fields named as megatron's)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ValueError(f"{path} not found: point at a Hugging Face model folder (config.json + *.safetensors)")
    hf = json.loads(path.read_text())
    archs = hf.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise _unsupported(path, f"architecture {archs or hf.get('model_type')!r}",
                           f"supported are {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(path, f"hidden_act={hf['hidden_act']!r}", "only SwiGLU (silu) MLPs are implemented")
    if hf.get("mlp_bias"):
        raise _unsupported(path, "mlp_bias=true", "the MLP projections must have no bias")
    if hf.get("use_sliding_window"):
        raise _unsupported(path, "use_sliding_window=true", "sliding-window attention is not implemented")
    if arch == "llama" and hf.get("attention_bias"):
        raise _unsupported(path, "attention_bias=true for Llama", "only Qwen2's q/k/v biases are implemented")
    heads = hf["num_attention_heads"]
    theta, scaling = _rope(hf, path)
    fields: dict[str, Any] = dict(
        name=Path(folder).name, arch=arch, num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096), rotary_base=theta,
        rope_scaling=bool(scaling), rope_scaling_factor=float(scaling["factor"]) if scaling else 8.0,
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), add_qkv_bias=arch == "qwen2", qk_layernorm=arch == "qwen3",
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        params_dtype=DTYPES.get(hf.get("dtype") or hf.get("torch_dtype") or "float32", "float32"),
        hf_path=str(folder),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model(model: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a config.json that transformers and vLLM load."""
    rope: dict[str, Any] = {"rope_theta": model.rotary_base, "rope_type": "default"}
    if model.rope_scaling:
        rope = {"rope_theta": model.rotary_base, "rope_type": "llama3", "factor": model.rope_scaling_factor,
                **LLAMA3_ROPE}
    cfg: dict[str, Any] = {
        "architectures": [HF_ARCH[model.arch]], "model_type": model.arch,
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": model.kv_channels,
        "vocab_size": model.vocab_size, "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon, "hidden_act": "silu",
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights, "dtype": model.params_dtype,
        "rope_theta": model.rotary_base, "rope_parameters": rope,
    }
    if model.rope_scaling:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if model.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if model.arch == "qwen3":
        cfg.update(attention_bias=False)
    return cfg
