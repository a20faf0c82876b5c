"""vLLM worker extension: named methods the trainer calls through `collective_rpc` to load weights.

Loaded by vLLM from its dotted path (`LLM(..., worker_extension_cls=...)` or the server's
`--worker-extension-cls`); methods run in every vLLM worker. vLLM's `reload_weights` loads the
tensors through the model's own `load_weights` (HF names; it fuses QKV / gate-up itself) and
restores the kernels' layout afterwards.
"""

from __future__ import annotations

import hashlib


class WeightSyncExtension:
    def gift_load_tensors(self, named_tensors: list) -> int:
        """In-process engines: (HF name, tensor) pairs passed by reference."""
        self.reload_weights(weights_iterator=list(named_tensors))
        return len(named_tensors)

    def gift_load_file(self, path: str) -> int:
        """Servers and multi-process engines: a safetensors bucket written by the trainer."""
        from safetensors.torch import load_file

        weights = list(load_file(path).items())
        self.reload_weights(weights_iterator=weights)
        return len(weights)

    def gift_checksum(self) -> str:
        """sha256 of the weights this worker serves, in name order: every non-empty parameter's bytes,
        and for each linear layer its output on a fixed probe input through the layer's own kernel.
        The probe matters on CPU, where vLLM packs linear weights for oneDNN and leaves the parameter
        empty: hashing parameters alone would miss every projection."""
        import torch
        from vllm.model_executor.layers.linear import LinearBase

        model = self.model_runner.model
        device = next(model.parameters()).device
        digest = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if p.numel():
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        with torch.no_grad():
            for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
                if isinstance(module, LinearBase):
                    g = torch.Generator().manual_seed(0)
                    probe = torch.randn(2, module.input_size_per_partition, generator=g)
                    bias = getattr(module, "bias", None)
                    out = module.quant_method.apply(module, probe.to(device, module.params_dtype), bias)
                    digest.update(name.encode())
                    digest.update(out.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def combine(worker_sums: list[str]) -> str:
    """One checksum for an engine from its workers' (TP shards), in worker order."""
    return hashlib.sha256("".join(worker_sums).encode()).hexdigest()
