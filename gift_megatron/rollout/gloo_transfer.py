"""The `gift_gloo` weight-transfer engine pair: vLLM's NCCL handshake and round trip, with a gloo
broadcast (CPU, and any machine without NCCL). gift_megatron.rollout.weight_transfer.register (our vLLM
plugin) registers these classes by module path, as vLLM registers its own engines, so this module, and
the vLLM modules it subclasses, is imported only in a process that makes a gift_gloo engine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
)
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

from gift_megatron.launch import is_loopback, listening_socket
from gift_megatron.rollout import GLOO_BACKEND as BACKEND


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


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What a worker is sent in /init_weight_transfer_engine."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 300.0


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The trainer's side; `backend` is how vLLM's trainer factory picks GlooTrainerWeightTransferEngine."""

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
