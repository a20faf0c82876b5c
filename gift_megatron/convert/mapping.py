"""Hugging Face <-> megatron-core names and layouts for Llama 3.x, Qwen2/2.5 and Qwen3. Pure torch.

One declarative table, read both ways. It serves checkpoint conversion (tools/hf_to_mcore.py,
tools/mcore_to_hf.py) and the weight sync to vLLM (rollout), so a name or layout fixed here is fixed
everywhere.

Megatron names are the canonical ones of megatron-core's dist checkpoints and Transformer Engine
layer spec (layer norms fused into the following linear: `linear_qkv.layer_norm_weight`), with
`{L}` the global layer index; the local layer spec's module names are mapped onto them by
`LOCAL_SPEC_ALIASES`. A "full" megatron tensor is the TP = 1 tensor; `shard`/`unshard` cut it for
a TP rank and put TP shards back together.

Special layouts (megatron-core 0.16):
- qkv: `linear_qkv` holds, for each of the ng query groups in turn, that group's q heads, then its
  k head, then its v head: [ng * (nq/ng + 2) * d, H]. TP ranks hold whole groups.
- fc1: `linear_fc1` is [gate; up] ([2F, H]); TP rank r holds [gate_r; up_r].
- vocab: embedding and output layer rows are padded to the TP-divisible vocabulary (zeros); HF gets
  the first vocab_size rows back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("replicated", "column", "row", "vocab", "qkv", "fc1")


@dataclass(frozen=True)
class Rule:
    mcore: str  # canonical megatron name, `{L}` = global layer index
    hf: tuple[str, ...]  # the HF tensors it is made of (several when fused)
    kind: str  # how it is fused and how TP splits it (KINDS)


_ATTN, _MLP = "decoder.layers.{L}.self_attention", "decoder.layers.{L}.mlp"
_HF = "model.layers.{L}"
LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")  # a per-layer megatron name: (layer index, the rest)
LAYER_RULES = (
    Rule(f"{_ATTN}.linear_qkv.layer_norm_weight", (f"{_HF}.input_layernorm.weight",), "replicated"),
    Rule(f"{_ATTN}.linear_qkv.weight", tuple(f"{_HF}.self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Rule(f"{_ATTN}.linear_proj.weight", (f"{_HF}.self_attn.o_proj.weight",), "row"),
    Rule(f"{_MLP}.linear_fc1.layer_norm_weight", (f"{_HF}.post_attention_layernorm.weight",), "replicated"),
    Rule(f"{_MLP}.linear_fc1.weight", (f"{_HF}.mlp.gate_proj.weight", f"{_HF}.mlp.up_proj.weight"), "fc1"),
    Rule(f"{_MLP}.linear_fc2.weight", (f"{_HF}.mlp.down_proj.weight",), "row"),
)
QKV_BIAS_RULES = (  # Qwen2 / Qwen2.5
    Rule(f"{_ATTN}.linear_qkv.bias", tuple(f"{_HF}.self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
)
QK_NORM_RULES = (  # Qwen3
    Rule(f"{_ATTN}.q_layernorm.weight", (f"{_HF}.self_attn.q_norm.weight",), "replicated"),
    Rule(f"{_ATTN}.k_layernorm.weight", (f"{_HF}.self_attn.k_norm.weight",), "replicated"),
)
EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated")
OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), "vocab")

LOCAL_SPEC_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def canonical_name(param_name: str) -> str:
    """A megatron module's parameter name (local or TE spec) -> the canonical name."""
    for local, canonical in LOCAL_SPEC_ALIASES.items():
        if param_name.endswith(local):
            return param_name[: -len(local)] + canonical
    return param_name


class ModelMapping:
    """Every (megatron name, HF names, layout) of one model, per layer."""

    def __init__(self, *, arch: str, num_layers: int, hidden_size: int, ffn_hidden_size: int,
                 num_attention_heads: int, num_query_groups: int, kv_channels: int, vocab_size: int,
                 padded_vocab_size: int, tied_embeddings: bool) -> None:
        layer_rules = LAYER_RULES + (QKV_BIAS_RULES if arch == "qwen2" else ()) + (
            QK_NORM_RULES if arch == "qwen3" else ())
        self.rules: dict[str, Rule] = {EMBEDDING.mcore: EMBEDDING, FINAL_NORM.mcore: FINAL_NORM}
        if not tied_embeddings:
            self.rules[OUTPUT.mcore] = OUTPUT
        for layer in range(num_layers):
            for r in layer_rules:
                named = Rule(r.mcore.format(L=layer), tuple(h.format(L=layer) for h in r.hf), r.kind)
                self.rules[named.mcore] = named
        self.groups, self.heads_per_group = num_query_groups, num_attention_heads // num_query_groups
        self.head_dim = kv_channels
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size
        self.hf_shapes = self._hf_shapes(hidden_size, ffn_hidden_size, num_attention_heads * kv_channels,
                                         num_query_groups * kv_channels)

    def _hf_shapes(self, hidden: int, ffn: int, q_out: int, kv_out: int) -> dict[str, tuple[int, ...]]:
        """The shape every HF tensor must have, from the config (to name a mismatch before use)."""
        by_suffix = {
            "embed_tokens.weight": (self.vocab_size, hidden), "lm_head.weight": (self.vocab_size, hidden),
            "q_proj.weight": (q_out, hidden), "k_proj.weight": (kv_out, hidden), "v_proj.weight": (kv_out, hidden),
            "q_proj.bias": (q_out,), "k_proj.bias": (kv_out,), "v_proj.bias": (kv_out,),
            "o_proj.weight": (hidden, q_out), "q_norm.weight": (self.head_dim,), "k_norm.weight": (self.head_dim,),
            "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden), "down_proj.weight": (hidden, ffn),
            "layernorm.weight": (hidden,), "norm.weight": (hidden,),
        }
        shapes = {}
        for name in self.hf_names():
            suffix = next(s for s in by_suffix if name.endswith(s))
            shapes[name] = by_suffix[suffix]
        return shapes

    def check_hf_shape(self, name: str, shape: tuple[int, ...], where: str = "") -> None:
        """A ValueError naming the tensor when its shape disagrees with the config."""
        want = self.hf_shapes[name]
        if tuple(shape) != want:
            raise ValueError(f"{where}tensor {name!r} has shape {tuple(shape)} but the config implies {want}: "
                             f"the weights and config.json do not belong together")

    @classmethod
    def from_config(cls, model, padded_vocab_size: int) -> ModelMapping:
        """From a gift_megatron.config.ModelConfig."""
        return cls(arch=model.arch, num_layers=model.num_layers, hidden_size=model.hidden_size,
                   ffn_hidden_size=model.ffn_hidden_size, num_attention_heads=model.num_attention_heads,
                   num_query_groups=model.num_query_groups, kv_channels=model.kv_channels,
                   vocab_size=model.vocab_size, padded_vocab_size=padded_vocab_size,
                   tied_embeddings=not model.untie_embeddings_and_output_weights)

    def hf_names(self) -> list[str]:
        return [h for r in self.rules.values() for h in r.hf]

    def rule(self, mcore_name: str) -> Rule:
        try:
            return self.rules[mcore_name]
        except KeyError:
            raise KeyError(f"no mapping for megatron tensor {mcore_name!r}") from None

    # -- full (TP = 1) megatron tensor <-> HF tensors -----------------------------------------------
    def to_mcore(self, mcore_name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        rule = self.rule(mcore_name)
        if rule.kind == "qkv":
            q, k, v = hf_tensors
            rest = q.shape[1:]
            g, d = self.groups, self.head_dim
            return torch.cat([q.reshape(g, self.heads_per_group * d, *rest), k.reshape(g, d, *rest),
                              v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)
        if rule.kind == "fc1":
            return torch.cat(hf_tensors, dim=0)
        (t,) = hf_tensors
        if rule.kind == "vocab" and self.padded_vocab_size > t.shape[0]:
            pad = t.new_zeros(self.padded_vocab_size - t.shape[0], *t.shape[1:])
            return torch.cat([t, pad])
        return t

    def to_hf(self, mcore_name: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
        rule = self.rule(mcore_name)
        if rule.kind == "qkv":
            rest = full.shape[1:]
            g, d = self.groups, self.head_dim
            grouped = full.reshape(g, (self.heads_per_group + 2) * d, *rest)
            q, k, v = grouped.split([self.heads_per_group * d, d, d], dim=1)
            parts = [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
        elif rule.kind == "fc1":
            parts = list(full.chunk(2, dim=0))
        elif rule.kind == "vocab":
            parts = [full[: self.vocab_size]]
        else:
            parts = [full]
        return {name: p.contiguous() for name, p in zip(rule.hf, parts)}

    # -- TP sharding of a full megatron tensor -----------------------------------------------------
    def shard(self, mcore_name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        kind = self.rule(mcore_name).kind
        if kind == "replicated" or tp_size == 1:
            return full
        if kind == "fc1":
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
        return full.chunk(tp_size, dim=1 if kind == "row" else 0)[tp_rank]

    def unshard(self, mcore_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
        kind = self.rule(mcore_name).kind
        if kind == "replicated" or len(shards) == 1:
            return shards[0]
        if kind == "fc1":
            halves = [s.chunk(2, dim=0) for s in shards]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        return torch.cat(shards, dim=1 if kind == "row" else 0)
