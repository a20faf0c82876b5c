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
        """sha256 over every parameter's bytes in name order: proves which weights the engine serves."""
        digest = hashlib.sha256()
        for name, p in sorted(self.model_runner.model.named_parameters()):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
