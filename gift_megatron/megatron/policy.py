"""Policy (DDP + Megatron optimizer + LR schedule) and frozen reference, on the same parallel layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from gift_megatron.config import ModelConfig, OptimConfig, ParallelConfig
from gift_megatron.megatron.model import DTYPES, build_gpt_models

Chunk = torch.nn.Module
"""A model chunk: this rank's part of one virtual pipeline stage (a GPTModel; the policy's wrapped in
megatron's DistributedDataParallel, the reference's plain)."""


@dataclass
class Policy:
    chunks: list[DistributedDataParallel]  # one per virtual pipeline stage
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler


def _optimizer_config(optim: OptimConfig, model: ModelConfig, parallel: ParallelConfig) -> OptimizerConfig:
    dtype = DTYPES[model.params_dtype]
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )


def _finalize_grads(model, num_tokens=None, **kwargs):
    """megatron's finalize_model_grads without its 1/num_tokens rescaling: our loss shares are
    already divided by global counts, so the summed gradients are final."""
    return finalize_model_grads(model, None, **kwargs)


def build_policy(model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, *, on_gpu: bool,
                 total_optimizer_steps: int) -> Policy:
    """GPTModel chunks wrapped in megatron DDP, the (distributed) Adam optimizer and its LR schedule.

    Gradients are reduced by SUM over DP (calculate_per_token_loss): our losses are shares of the
    global loss. The schedule's finalize hook runs megatron's `finalize_model_grads` (DP reduction,
    tied-embedding all-reduce across pipeline stages).
    """
    chunks = build_gpt_models(model, parallel, on_gpu=on_gpu)
    tconfig = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    ddp_chunks = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(_optimizer_config(optim, model, parallel), ddp_chunks)
    tconfig.no_sync_func = [c.no_sync for c in ddp_chunks] if len(ddp_chunks) > 1 else ddp_chunks[0].no_sync
    tconfig.finalize_model_grads_func = _finalize_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    o = optim
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.lr_warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.lr_warmup_steps, lr_decay_steps=max(total_optimizer_steps, o.lr_warmup_steps + 1),
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(total_optimizer_steps, 1), wd_incr_style="constant",
    )
    return Policy(ddp_chunks, optimizer, scheduler)


def build_reference(model: ModelConfig, parallel: ParallelConfig, *, on_gpu: bool) -> list[Chunk]:
    """The frozen reference: same layout as the policy, eval mode, no grads, no optimizer state."""
    chunks = build_gpt_models(model, parallel, on_gpu=on_gpu)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def move_chunks(chunks: list[Chunk], device: str | torch.device) -> None:
    """Offload the reference to host memory between uses on GPUs (and bring it back)."""
    for chunk in chunks:
        chunk.to(device)


@torch.no_grad()
def copy_weights(src_chunks: list[Chunk], dst_chunks: list[Chunk]) -> None:
    """Copy model weights between two identically laid-out sets of chunks (e.g. policy -> reference)."""
    for src, dst in zip(src_chunks, dst_chunks):
        src_sd = getattr(src, "module", src).state_dict()
        getattr(dst, "module", dst).load_state_dict(src_sd)
