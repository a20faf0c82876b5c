"""Weight sync through vLLM's weight-transfer API: a process group shared by the trainer's rank 0 and
every server worker, driven over HTTP (/init_weight_transfer_engine, /start_weight_update,
/update_weights, /finish_weight_update), each request with the server's bearer secret.

Backends:
- `nccl` (GPUs): vLLM's own NCCL engines on both sides; tensors are broadcast GPU to GPU.
- `gift_gloo` (CPU, and any machine without NCCL): the same handshake and round trip with a gloo
  broadcast: a vLLM weight-transfer engine pair (gift_megatron.rollout.gloo_transfer) registered in
  every vLLM process by `register` below, our `vllm.general_plugins` entry point (setup.py). It is
  what CI runs: the control plane, the rank layout over several servers and the metadata contract
  are the ones the NCCL path uses.

Only global rank 0 of the trainer sends (the others have already sent their shards to it through
gift_megatron.megatron.weight_sync); names, dtypes and shapes of a round are recorded while the
trainer's start-up gather streams past (gift_megatron.build) and every round is checked against them
(vLLM sizes its receive buffers from them), so no round has to hold the whole model at once.
Servers are given rank offsets 1, 1 + workers(server 0), ... in one group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from gift_megatron.rollout import GLOO_BACKEND as BACKEND

log = logging.getLogger(__name__)


def backend_for(weight_sync: str, on_gpu: bool) -> str | None:
    """rollout.weight_sync -> the vLLM weight-transfer backend servers start with (None: bucket files)."""
    if weight_sync == "auto":
        weight_sync = "nccl" if on_gpu else "files"
    return {"nccl": "nccl", "gloo": BACKEND}.get(weight_sync)


# ---------------------------------------------------------------- the gloo engine pair (vLLM plugin)

_GLOO_ENGINES = "gift_megatron.rollout.gloo_transfer"


def register() -> None:
    """vLLM plugin hook (setup.py), run in every vLLM process: registers the gift_gloo engine pair by
    module path, as vLLM registers its own engines, so gloo_transfer is imported only where one is
    made. Idempotent (the trainer calls it too, and vLLM may have loaded the plugin already)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, engine in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                            (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        if BACKEND not in factory._registry:  # register_engine refuses a name twice
            factory.register_engine(BACKEND, _GLOO_ENGINES, engine)


# ---------------------------------------------------------------- the trainer side, any backend

class _RoundSource:
    """vLLM's WeightSource contract: metadata() agrees element for element with iteration. Metadata
    comes from the first full pass (recorded at sync 0); each round's stream is checked against it."""

    def __init__(self, meta) -> None:
        self.meta, self.stream = meta, None

    def metadata(self):
        return self.meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        stream, self.stream = self.stream, None
        if stream is None:
            raise RuntimeError("weight transfer: no weights were handed over for this round")
        count = 0
        for (name, tensor), m in zip(stream, self.meta, strict=True):
            if (name, tensor.dtype, tuple(tensor.shape)) != (m.name, m.dtype, tuple(m.shape)):
                raise RuntimeError(f"weight transfer: tensor {count} is {name} {tuple(tensor.shape)} "
                                   f"{tensor.dtype}, the servers expect {m.name} {tuple(m.shape)} {m.dtype}")
            count += 1
            yield name, tensor


def _authorized_client(url: str, timeout_s: float):
    """vLLM's HTTP weight-sync client, sending our servers' bearer secret (`headers`, set by ServerPool)."""
    import requests
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

    class Client(HTTPVLLMWeightSyncClient):
        def __init__(self, base_url: str, timeout: float) -> None:
            super().__init__(base_url, timeout)
            self.headers: dict[str, str] = {}

        def _post(self, path: str, json: dict[str, Any] | None = None) -> None:
            requests.post(f"{self.base_url}/{path}", json=json, headers=self.headers,
                          timeout=self.timeout).raise_for_status()

    return Client(url, timeout=timeout_s)


class _FanOutClient:
    """vLLM's VLLMWeightSyncClient over several servers: every call goes to all of them at once (the
    workers of all servers block together in the same broadcasts); each server gets its rank offset."""

    def __init__(self, urls: list[str], offsets: list[int], timeout_s: float) -> None:
        self.clients = [_authorized_client(u, timeout_s) for u in urls]
        self.offsets = offsets

    @property
    def headers(self) -> list[dict[str, str]]:
        return [c.headers for c in self.clients]

    @headers.setter
    def headers(self, per_server: list[dict[str, str]]) -> None:
        for client, headers in zip(self.clients, per_server, strict=True):
            client.headers = headers

    def _all(self, call) -> None:
        import requests

        from gift_megatron.rollout.servers import ServerError

        with ThreadPoolExecutor(max_workers=len(self.clients)) as pool:
            futures = [pool.submit(call, i, c) for i, c in enumerate(self.clients)]
            for client, f in zip(self.clients, futures):
                try:
                    f.result()
                except requests.RequestException as e:
                    raise ServerError(f"vLLM server {client.base_url} failed in weight transfer: {e}") from None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all(lambda i, c: c.init_weight_transfer_engine({**init_info, "rank_offset": self.offsets[i]}))

    def start_weight_update(self) -> None:
        self._all(lambda i, c: c.start_weight_update())

    def update_weights(self, update_info) -> None:
        self._all(lambda i, c: c.update_weights(update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda i, c: c.finish_weight_update(weight_version))

    def shutdown_weight_transfer_engine(self) -> None:
        self._all(lambda i, c: c.shutdown_weight_transfer_engine())


class WeightTransfer:
    """Rank 0's sender: `send(named_tensors)` pushes one full round into every server.

    `meta`: (name, dtype, shape) of every tensor a round yields, in order. `workers_per_server[i]`
    is server i's worker count (its TP x PP); the group has 1 + their sum ranks. The first round
    opens the group (the servers' /init call)."""

    def __init__(self, backend: str, urls: list[str], workers_per_server: list[int],
                 meta: list[tuple[str, torch.dtype, tuple[int, ...]]], *, master_address: str, master_port: int,
                 timeout_s: float) -> None:
        self.backend, self.urls, self.meta = backend, urls, meta
        offsets = [1 + sum(workers_per_server[:i]) for i in range(len(urls))]
        self.client = _FanOutClient(urls, offsets, timeout_s)
        self.world_size = 1 + sum(workers_per_server)
        self.address, self.port, self.timeout_s = master_address, master_port, timeout_s
        self.engine = None

    def _open(self) -> None:
        from vllm.distributed.weight_transfer.base import ParamMeta
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        meta = [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in self.meta]
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            info = NCCLTrainerInitInfo(master_address=self.address, master_port=self.port,
                                       world_size=self.world_size, rank=0)
        else:
            from gift_megatron.rollout.gloo_transfer import GlooTrainerInitInfo

            register()
            info = GlooTrainerInitInfo(master_address=self.address, master_port=self.port,
                                       world_size=self.world_size, timeout_s=self.timeout_s, rank=0)
        self.source = _RoundSource(meta)
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=self.source)
        log.info("weight transfer (%s) open: %d servers, group of %d, %d tensors", self.backend, len(self.urls),
                 self.world_size, len(meta))

    def send(self, named_tensors) -> tuple[int, int]:
        """One full round; returns (tensors, bytes)."""
        if self.engine is None:
            self._open()
        counted = {"n": 0, "bytes": 0}

        def counting():
            for name, t in named_tensors:
                if self.backend == "nccl" and not t.is_cuda:
                    t = t.cuda()
                counted["n"] += 1
                counted["bytes"] += t.numel() * t.element_size()
                yield name, t

        self.source.stream = counting()
        start = time.perf_counter()
        self.engine.send_weights()
        log.debug("weight transfer: %d tensors in %.3f s", counted["n"], time.perf_counter() - start)
        return counted["n"], counted["bytes"]

    def close(self) -> None:
        if self.engine is not None:
            try:
                self.client.shutdown_weight_transfer_engine()
            except Exception as e:  # the servers may already be gone at shutdown
                log.warning("weight transfer shutdown: %s", e)
            self.engine.shutdown()
            self.engine = None
