"""Config -> megatron-core translation, TE/FP8 selection, the CPU compatibility layer, rank discovery."""

import pytest
import torch
import torch.nn.functional as F

from gift_megatron.config import ModelConfig, ParallelConfig
from gift_megatron.launch import run_distributed
from gift_megatron.megatron import cpu_compat
from gift_megatron.megatron.model import (
    padded_vocab_size,
    te_available,
    transformer_config,
    use_transformer_engine,
)
from gift_megatron.megatron.parallel import rank_from_env
from tests.procs import explain

QWEN32B = dict(name="qwen2.5-32b", arch="qwen2", num_layers=64, hidden_size=5120, ffn_hidden_size=27648,
               num_attention_heads=40, num_query_groups=8, kv_channels=128, vocab_size=152064,
               rotary_base=1e6, norm_epsilon=1e-5, add_qkv_bias=True, params_dtype="bfloat16")


def test_transformer_config_for_qwen2_32b_on_the_sbatch_layout_with_fp8():
    model = ModelConfig(**QWEN32B, transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="delayed")
    parallel = ParallelConfig(world_size=32, tensor_model_parallel_size=8, pipeline_model_parallel_size=2,
                              sequence_parallel=True)
    c = transformer_config(model, parallel, use_te=True, on_gpu=True)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (64, 5120, 27648)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (40, 8, 128)
    assert c.add_qkv_bias and not c.add_bias_linear and not c.qk_layernorm
    assert c.gated_linear_unit and c.activation_func is F.silu and c.normalization == "RMSNorm"
    assert c.layernorm_epsilon == 1e-5
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size, c.sequence_parallel) == (8, 2, True)
    assert c.bf16 and not c.fp16 and c.params_dtype == torch.bfloat16 and c.pipeline_dtype == torch.bfloat16
    assert (c.fp8, c.fp8_recipe, c.fp8_amax_history_len, c.fp8_amax_compute_algo) == ("hybrid", "delayed", 1024, "max")
    assert c.bias_activation_fusion and c.masked_softmax_fusion  # TE fused kernels on GPUs
    assert not c.use_cpu_initialization
    assert c.calculate_per_token_loss  # our losses are globally normalised: no rescaling by megatron


def test_transformer_config_current_scaling_fp8_and_cpu_fp32():
    c = transformer_config(ModelConfig(**QWEN32B, fp8="e4m3", fp8_recipe="tensorwise"),
                           ParallelConfig(world_size=8, tensor_model_parallel_size=8), use_te=True, on_gpu=True)
    assert (c.fp8, c.fp8_recipe, c.fp8_amax_history_len, c.fp8_amax_compute_algo) == (
        "e4m3", "tensorwise", 1, "most_recent")
    cpu = transformer_config(ModelConfig(qk_layernorm=True), ParallelConfig(), use_te=False, on_gpu=False)
    assert cpu.fp8 is None and cpu.params_dtype == torch.float32 and not cpu.bf16
    assert cpu.use_cpu_initialization and cpu.qk_layernorm
    assert not cpu.bias_activation_fusion and not cpu.masked_softmax_fusion and not cpu.gradient_accumulation_fusion


def test_interleaved_schedule_uses_unbatched_p2p():
    c = transformer_config(ModelConfig(num_layers=4), ParallelConfig(
        world_size=2, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), use_te=False,
        on_gpu=False)
    assert c.overlap_p2p_comm and not c.batch_p2p_comm
    plain = transformer_config(ModelConfig(), ParallelConfig(), use_te=False, on_gpu=False)
    assert plain.batch_p2p_comm and not plain.overlap_p2p_comm


def test_transformer_engine_selection_and_errors():
    assert use_transformer_engine(ModelConfig(), te_present=False) is False  # auto -> local spec
    assert use_transformer_engine(ModelConfig(), te_present=True) is True
    assert use_transformer_engine(ModelConfig(transformer_impl="local"), te_present=True) is False
    with pytest.raises(ValueError, match=r"model.fp8=hybrid needs Transformer Engine.*pip install -e \.\[gpu\]"):
        use_transformer_engine(ModelConfig(fp8="hybrid"), te_present=False)
    with pytest.raises(ValueError, match="model.transformer_impl=transformer_engine needs Transformer Engine"):
        use_transformer_engine(ModelConfig(transformer_impl="transformer_engine"), te_present=False)
    if not torch.cuda.is_available():
        assert te_available() is False  # TE cannot import without libcuda


def test_padded_vocab_size_follows_megatron():
    assert padded_vocab_size(ModelConfig(vocab_size=152064), 1) == 152064  # Qwen2.5: a multiple of 128
    assert padded_vocab_size(ModelConfig(vocab_size=152064), 8) == 152576  # next multiple of 128 x 8
    assert padded_vocab_size(ModelConfig(vocab_size=128256), 8) == 129024  # Llama 3: 125.25 x 1024 -> 126
    assert padded_vocab_size(ModelConfig(vocab_size=64, make_vocab_size_divisible_by=1), 2) == 64
    assert padded_vocab_size(ModelConfig(vocab_size=65, make_vocab_size_divisible_by=1), 2) == 66


def test_rank_from_torchrun_and_slurm_environments():
    info = rank_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank) == (3, 8, 1)
    info = rank_from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"})
    assert (info.rank, info.world_size, info.local_rank) == (5, 16, 1)
    # torchrun's variables win over Slurm's when both are set (torchrun inside an allocation).
    info = rank_from_env({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "16"})
    assert (info.rank, info.world_size) == (0, 2)
    info = rank_from_env({})
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)


def test_init_distributed_rejects_a_wrong_world_size(monkeypatch):
    from gift_megatron.megatron.parallel import init_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="parallel.world_size=4 but 1 processes were launched"):
        init_distributed(ParallelConfig(world_size=4), on_gpu=False)


def _compat_worker(rank, world):
    import importlib

    before = {m: importlib.import_module(m).torch is torch for m in cpu_compat.PROXIED_MODULES}
    active = cpu_compat.apply_if_no_cuda()
    utils = importlib.import_module("megatron.core.utils")
    after = {m: importlib.import_module(m).torch is not torch for m in cpu_compat.PROXIED_MODULES}
    made = utils.torch.zeros(2, device="cuda")
    with cpu_compat.cuda_type_strings():
        inside = torch.zeros(1).type()
    from megatron.core.optimizer import distrib_optimizer

    return {"before": all(before.values()), "active": active, "after": all(after.values()),
            "device": made.device.type, "outside": torch.zeros(1).type(), "inside": inside,
            "idempotent": cpu_compat.apply_if_no_cuda() and cpu_compat.is_applied(),
            "scoped": getattr(distrib_optimizer.DistributedOptimizer.__init__, "_gift_cpu_compat", False),
            "current_device": utils.torch.cuda.current_device()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is applied only without CUDA")
def test_cpu_compat_is_narrow_and_applied_only_without_cuda():
    res = run_distributed(_compat_worker, 1)[0]
    assert res["before"] and res["active"] and res["after"] and res["idempotent"] and res["scoped"]
    assert res["device"] == "cpu" and res["current_device"] == "cpu"
    assert res["inside"] == "torch.cuda.FloatTensor"  # only inside the scoped megatron calls ...
    assert res["outside"] == "torch.FloatTensor"  # ... never globally


def test_mpi_launch_discovers_ranks_and_rendezvous():
    """mpiexec (the mpich wheel's) with no RANK/MASTER_* set: mpi4py gives rank, size and local rank;
    rank 0's address and a free port are broadcast over MPI; gloo's all_reduce then works."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    mpiexec = Path(sys.executable).parent / "mpiexec"
    proc = subprocess.run([str(mpiexec), "-n", "2", sys.executable, "tests/mpi_rendezvous.py"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, explain(proc) + str(sorted(env))
    assert sorted(line for line in proc.stdout.replace("rank ", "\nrank ").splitlines() if line) == [
        "rank 0/2 local 0 sum 3.0", "rank 1/2 local 1 sum 3.0"]
