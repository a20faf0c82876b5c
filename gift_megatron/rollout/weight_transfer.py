"""Weight sync through vLLM's weight-transfer API: a process group shared by the trainer's rank 0 and
every server worker, driven over HTTP (/init_weight_transfer_engine, /start_weight_update,
/update_weights, /finish_weight_update), each request with the server's bearer secret.

Backends:
- `nccl` (GPUs): vLLM's own NCCL engines on both sides; tensors are broadcast GPU to GPU.
- `gift_gloo` (CPU, and any machine without NCCL): the same handshake and round trip with a gloo
  broadcast, implemented here as a vLLM weight-transfer engine pair and registered in every vLLM
  process through the `vllm.general_plugins` entry point (setup.py). It is what CI runs: the
  control plane, the rank layout over several servers and the metadata contract are the ones the
  NCCL path uses.

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
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from gift_megatron.launch import is_loopback, listening_socket

log = logging.getLogger(__name__)
BACKEND = "gift_gloo"


def backend_for(weight_sync: str, on_gpu: bool) -> str | None:
    """rollout.weight_sync -> the vLLM weight-transfer backend servers start with (None: bucket files)."""
    if weight_sync == "auto":
        weight_sync = "nccl" if on_gpu else "files"
    return {"nccl": "nccl", "gloo": BACKEND}.get(weight_sync)


# ---------------------------------------------------------------- the gloo engine pair (vLLM plugin)

def _gloo_group(address: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group of its own (not torch.distributed's default group), over a TCPStore. On a
    loopback address the store and every rank's gloo sockets listen there only (a TCPStore server
    given no socket listens on every interface; gloo binds the hostname's address)."""
    local = is_loopback(address)
    fd = listening_socket(address, port).detach() if rank == 0 and local else None  # the store closes it
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=fd)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timedelta(seconds=timeout_s)
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=address) if local
                        else dist.ProcessGroupGloo.create_default_device()]
    return dist.ProcessGroupGloo(dist.PrefixStore("gift_weight_transfer", store), rank, world_size, options), store


def _broadcast(group, tensor: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([tensor], opts).wait()


def register() -> None:
    """vLLM plugin hook: register the gift_gloo engines (idempotent; runs in every vLLM process)."""
    from vllm.distributed.weight_transfer.base import (
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightTransferEngine,
        WeightTransferInitInfo,
    )
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

    if BACKEND in WeightTransferEngineFactory._registry:
        return

    @dataclass
    class GlooInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int
        timeout_s: float = 300.0

    @dataclass
    class GlooTrainerInitInfo(TrainerInitInfo):
        backend: ClassVar[str] = BACKEND
        master_address: str
        master_port: int
        world_size: int
        timeout_s: float = 300.0

    class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, NCCLWeightTransferUpdateInfo]):
        """Worker side: joins the group at rank_offset + its worker rank, receives each tensor by
        broadcast from rank 0 and loads it through vLLM's layerwise reload (as the NCCL engine does)."""

        init_info_cls = GlooInitInfo
        update_info_cls = NCCLWeightTransferUpdateInfo

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.group = self.store = self.session = None

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            pc = self.parallel_config
            rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
            self.group, self.store = _gloo_group(init_info.master_address, init_info.master_port, rank,
                                                 init_info.world_size, init_info.timeout_s)

        def start_weight_update(self) -> None:
            from gift_megatron.rollout.reload import ReloadSession

            self.session = ReloadSession(self.model, self.model_config)

        def finish_weight_update(self) -> None:
            session, self.session = self.session, None
            session.finish()  # raises, naming them, if any parameter was left stale or partly loaded

        def receive_weights(self, update_info) -> None:
            if self.group is None:
                raise RuntimeError("gift_gloo weight transfer not initialized: call /init_weight_transfer_engine")
            for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
                weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
                _broadcast(self.group, weight)
                self.session.load([(name, weight.to(self.device))])

        def shutdown(self) -> None:
            self.group = self.store = None

    class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
        """Trainer side (rank 0 sends): the NCCL trainer engine's round trip with a gloo broadcast."""

        init_info_cls = GlooTrainerInitInfo

        @classmethod
        def trainer_init(cls, init_info, *, client, source=None):
            engine = cls(client=client, source=source, is_sender=init_info.is_sender)
            engine.group = None
            if not engine.is_sender:
                return engine
            worker_info = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                           "rank_offset": 1, "world_size": init_info.world_size, "timeout_s": init_info.timeout_s}
            with ThreadPoolExecutor(max_workers=1) as pool:  # the workers block in the rendezvous too
                future = pool.submit(client.init_weight_transfer_engine, worker_info)
                engine.group, engine.store = _gloo_group(init_info.master_address, init_info.master_port, 0,
                                                         init_info.world_size, init_info.timeout_s)
                future.result()
            return engine

        def send_weights(self) -> None:
            meta = self.source.metadata()
            if not self.is_sender:
                for _ in self.source:
                    pass
                return
            info = NCCLWeightTransferUpdateInfo(names=[m.name for m in meta],
                                                dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                                shapes=[list(m.shape) for m in meta])
            self.client.start_weight_update()
            pool = ThreadPoolExecutor(max_workers=1)
            try:
                future = pool.submit(self.client.update_weights, asdict(info))
                for _, tensor in self.source:
                    _broadcast(self.group, tensor.detach().cpu().contiguous())
                future.result()
            finally:
                pool.shutdown(wait=False)  # a failed broadcast leaves the RPC blocked: never join it
            self.client.finish_weight_update()

        def shutdown(self) -> None:
            self.group = self.store = None

    WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    WeightTransferTrainerFactory.register_engine(BACKEND, GlooTrainerWeightTransferEngine)
    register.init_info = GlooTrainerInitInfo  # for the trainer side below


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
            register()
            info = register.init_info(master_address=self.address, master_port=self.port,
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
