"""Process groups: torch.distributed from torchrun or Slurm, megatron-core's model-parallel groups."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from gift_megatron.config import ParallelConfig
from gift_megatron.launch import free_port, listening_socket
from gift_megatron.megatron import cpu_compat

log = logging.getLogger(__name__)


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


_MPI_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")  # set by mpiexec or srun --mpi=pmi2|pmix


def launched_by_mpi(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(v in env for v in _MPI_VARS)


def rank_from_mpi() -> RankInfo:
    """Rank, size and node-local rank from MPI (mpi4py); MASTER_ADDR/MASTER_PORT, when the launcher did
    not set them, from rank 0 (its address and a free port, broadcast over MPI) and exported."""
    import socket

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        buf = bytearray(256)  # "addr port" as raw bytes (no pickling)
        if comm.Get_rank() == 0:
            text = (f"{os.environ.get('MASTER_ADDR') or socket.gethostbyname(socket.gethostname())} "
                    f"{os.environ.get('MASTER_PORT') or free_port()}").encode()
            buf[:len(text)] = text
        comm.Bcast([buf, MPI.BYTE], root=0)
        addr, port = buf.rstrip(b"\0").decode().split()
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=port)
    return RankInfo(comm.Get_rank(), comm.Get_size(), local)


def rank_from_env(env: dict[str, str] | None = None) -> RankInfo:
    """RANK/WORLD_SIZE/LOCAL_RANK as torchrun sets them, else MPI's (mpiexec, srun --mpi=pmi2|pmix),
    else Slurm's SLURM_PROCID/NTASKS/LOCALID."""
    env = os.environ if env is None else env
    if "RANK" not in env and launched_by_mpi(env):
        return rank_from_mpi()
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return RankInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return RankInfo(0, 1, 0)


def init_distributed(parallel: ParallelConfig, on_gpu: bool) -> RankInfo:
    """Join (or create) the default process group: NCCL on GPUs, gloo on CPU."""
    info = rank_from_env()
    if info.world_size != parallel.world_size:
        raise ValueError(f"parallel.world_size={parallel.world_size} but {info.world_size} processes were "
                         f"launched: set parallel.world_size={info.world_size} or launch that many ranks")
    if on_gpu:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        if info.world_size > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            raise ValueError("MASTER_ADDR and MASTER_PORT must be set for a multi-process run "
                             "(torchrun sets them; under Slurm export them from the first node's address)")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        store = loopback_store() if info.world_size == 1 else None
        dist.init_process_group("nccl" if on_gpu else "gloo", store=store, rank=info.rank,
                                world_size=info.world_size)
    return info


def loopback_store() -> dist.TCPStore:
    """A one-process world's store on 127.0.0.1 only, on a fresh port each time (runs may share a
    machine; a Hydra multirun builds several worlds in one process; MASTER_PORT inherited from a
    parent would make concurrent runs collide). env:// would open a TCPStore listening on every
    interface or, with launch_local's TORCHELASTIC_USE_AGENT_STORE inherited (a multi-rank run's
    warm-up subprocess), wait for a store nobody opens."""
    sock = listening_socket("127.0.0.1", 0)
    return dist.TCPStore("127.0.0.1", sock.getsockname()[1], 1, True, master_listen_fd=sock.detach())


def init_model_parallel(parallel: ParallelConfig, seed: int, on_gpu: bool) -> None:
    """megatron-core's TP/PP/DP groups on the default process group, and seeded RNGs.

    Seeding follows Megatron-LM: seed + 100 x PP rank for the default generators; megatron's
    model-parallel RNG tracker forks per-TP-rank streams. On CPU the compatibility layer is applied
    first (megatron-core assumes CUDA in a few places).
    """
    if not on_gpu:
        cpu_compat.apply_if_no_cuda()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
