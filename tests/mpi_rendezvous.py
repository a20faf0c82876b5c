"""Run under an MPI launcher (mpiexec, srun --mpi=pmi2): ranks and the gloo rendezvous come from mpi4py."""
import torch
import torch.distributed as dist

from gift_megatron.config import ParallelConfig
from gift_megatron.megatron.parallel import init_distributed

info = init_distributed(ParallelConfig(world_size=2, micro_batch_size=8), on_gpu=False)
x = torch.tensor([float(info.rank + 1)])
dist.all_reduce(x)
print(f"rank {info.rank}/{info.world_size} local {info.local_rank} sum {x.item()}", flush=True)
dist.destroy_process_group()
