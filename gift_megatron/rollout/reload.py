"""Inside a vLLM worker: one in-place reload session per weight sync, checked, with tied heads refreshed.

The sync contract (docs/design.md): after every sync the engine samples with exactly the trainer's weights.
vLLM's layerwise reload buffers each layer's incoming tensors and processes the layer (on CPU:
re-packs it for oneDNN) once all its elements have arrived; at `finalize` a layer that got only part
of its sources (q and k of a fused qkv_proj, but not v) is processed with uninitialised memory in
the rest, and a layer that got nothing keeps its old kernel. Two things follow:

- A session spans every bucket of a sync (`ReloadSession`: begin, load bucket after bucket, finish),
  so where a bucket boundary falls does not matter; the trainer's buckets also never split the
  sources of one engine parameter (gift_megatron.rollout.engine.sync_unit).
- A tied LM head shares its weight with the input embedding but keeps a kernel of its own on CPU
  (`cpu_linear`, oneDNN-packed at load). It receives no tensor of its own, so the reload leaves that
  kernel stale ("ParallelLMHead: Failed to load weights"). `finish` re-processes every module whose
  weight is shared with a module that was reloaded.

`finish` raises, naming them, when a parameter got no tensor or a layer got only part of its
sources: a sync that leaves any weight stale or corrupt is an error, never a log line.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class SyncIncomplete(RuntimeError):
    """A weight sync left engine parameters stale or partly loaded; the message names them."""


def _partially_loaded(model: torch.nn.Module) -> list[str]:
    """Layers that received some but not all of their elements in this session (padding aside)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    partial = []
    for name, layer in model.named_modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load() or isinstance(layer, VocabParallelEmbedding):
            continue  # vocabulary rows past the tokenizer's are padding nobody loads
        if 0 < info.load_numel < info.load_numel_total:
            partial.append(f"{name} ({info.load_numel} of {info.load_numel_total} elements)")
    return partial


def refresh_shared_weight_kernels(model: torch.nn.Module) -> list[str]:
    """Re-process each module whose `weight` is the same Parameter as an earlier module's (a tied LM
    head): its kernel (oneDNN-packed on CPU) is rebuilt from the shared, freshly loaded weight. A
    no-op for the weights on GPU, where unquantized layers use the parameter directly."""
    seen: set[int] = set()
    refreshed = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None:
            continue
        if id(weight) in seen and hasattr(getattr(module, "quant_method", None), "process_weights_after_loading"):
            module.quant_method.process_weights_after_loading(module)
            refreshed.append(name)
        seen.add(id(weight))
    return refreshed


class ReloadSession:
    """One in-place reload of a model's weights, fed bucket by bucket (checkpoint-format HF names)."""

    def __init__(self, model: torch.nn.Module, model_config) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.model, self.model_config = model, model_config
        self.expected = {name for name, _ in model.named_parameters()}
        self.loaded: set[str] = set()
        self.num_tensors = 0
        initialize_layerwise_reload(model)

    def load(self, named_tensors) -> int:
        named_tensors = list(named_tensors)
        self.loaded |= set(self.model.load_weights(named_tensors))
        self.num_tensors += len(named_tensors)
        return len(named_tensors)

    def finish(self) -> dict:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        partial = _partially_loaded(self.model)
        with _quiet_expected_warnings():
            finalize_layerwise_reload(self.model, self.model_config)
        refreshed = refresh_shared_weight_kernels(self.model)
        missing = sorted(self.expected - self.loaded)
        if partial or missing:
            raise SyncIncomplete(
                "weight sync left the engine with stale or partly loaded weights: "
                + "; ".join(filter(None, [f"no tensor for {', '.join(missing)}" if missing else "",
                                          f"partly loaded {', '.join(partial)}" if partial else ""]))
                + ". The trainer must send every engine parameter's sources in one sync (a bug: report it)")
        return {"tensors": self.num_tensors, "parameters": len(self.loaded), "refreshed_tied": refreshed}


class _quiet_expected_warnings:
    """vLLM warns "<Layer>: Failed to load weights" for every module that got no tensor in a reload:
    tied heads and rotary embeddings, every sync. `finish` checks coverage itself (and raises on a
    real gap), so those lines are dropped while finalize runs; anything else still shows."""

    def __enter__(self):
        self.logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        self.filter = lambda record: "Failed to load weights" not in record.getMessage()
        self.logger.addFilter(self.filter)

    def __exit__(self, *exc):
        self.logger.removeFilter(self.filter)
