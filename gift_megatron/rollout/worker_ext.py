"""vLLM worker extension: named methods the trainer calls through `collective_rpc` to load weights.

Loaded by vLLM from its dotted path (`LLM(..., worker_extension_cls=...)` or the server's
`--worker-extension-cls`); methods run in every vLLM worker. Tensors go through the model's own
`load_weights` (HF names; it fuses QKV / gate-up itself) inside one layerwise-reload session per
sync, which restores the kernels' layout afterwards (gift_megatron.rollout.reload).
"""

from __future__ import annotations

import hashlib


class WeightSyncExtension:
    """A sync is `gift_begin_sync`, then `gift_load_tensors`/`gift_load_file` per bucket, then
    `gift_finish_sync` (gift_megatron.rollout.reload.ReloadSession: one reload session across all
    buckets, checked, tied heads refreshed)."""

    def _gift_model(self):
        return self.model_runner.model

    def gift_begin_sync(self) -> None:
        from vllm.config import set_current_vllm_config

        from gift_megatron.rollout.reload import ReloadSession

        with set_current_vllm_config(self.vllm_config):
            self._gift_session = ReloadSession(self._gift_model(), self.vllm_config.model_config)

    def _gift_load(self, named_tensors) -> int:
        from vllm.config import set_current_vllm_config

        session = getattr(self, "_gift_session", None)
        if session is None:
            raise RuntimeError("gift_load_* outside a sync: call gift_begin_sync first")
        with set_current_vllm_config(self.vllm_config):
            return session.load(named_tensors)

    def gift_load_tensors(self, named_tensors: list) -> int:
        """In-process engines: (HF name, tensor) pairs passed by reference."""
        return self._gift_load(named_tensors)

    def gift_load_file(self, path: str) -> int:
        """Servers and multi-process engines: a safetensors bucket written by the trainer."""
        from safetensors.torch import load_file

        return self._gift_load(load_file(path).items())

    def gift_finish_sync(self) -> dict:
        from vllm.config import set_current_vllm_config

        session, self._gift_session = getattr(self, "_gift_session", None), None
        if session is None:
            raise RuntimeError("gift_finish_sync without gift_begin_sync")
        with set_current_vllm_config(self.vllm_config):
            return session.finish()

    def gift_refresh_tied(self) -> list[str]:
        """After a sync through vLLM's own weight-transfer engine (NCCL): rebuild tied heads' kernels."""
        from gift_megatron.rollout.reload import refresh_shared_weight_kernels

        return refresh_shared_weight_kernels(self._gift_model())

    def gift_checksum(self) -> str:
        """sha256 of the weights this worker samples with, in name order: every non-empty parameter's
        bytes, and for each linear layer and LM head its output on a fixed probe input through the
        layer's own kernel. The probe matters on CPU, where vLLM packs linear weights (and a tied
        head's copy of the embedding) for oneDNN and leaves the parameter empty or shared: hashing
        parameters alone would miss every projection and a stale head."""
        import torch
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        model = self._gift_model()
        device = next(model.parameters()).device
        digest = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if p.numel():
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        with torch.no_grad():
            for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
                if isinstance(module, LinearBase | ParallelLMHead):
                    width = module.input_size_per_partition  # LM heads: their embedding dim
                    dtype = getattr(module, "params_dtype", module.weight.dtype)
                    probe = torch.randn(2, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                    out = module.quant_method.apply(module, probe, getattr(module, "bias", None))
                    digest.update(name.encode())
                    digest.update(out.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def combine(worker_sums: list[str]) -> str:
    """One checksum for an engine from its workers' (TP shards), in worker order."""
    return hashlib.sha256("".join(worker_sums).encode()).hexdigest()
