"""Our model config -> megatron-core TransformerConfig + GPTModel (policy and reference).

Llama, Qwen2 and Qwen3 are all GPTModels with RoPE, SwiGLU, RMSNorm and GQA; Qwen2 adds QKV bias,
Qwen3 QK-norm. With Transformer Engine importable (and `transformer_impl` auto or
transformer_engine) the TE layer spec is used, with FP8 when `model.fp8` is set; otherwise the
local spec. Asking for TE or FP8 without TE is a ValueError that says how to get it.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig

from gift_megatron.config import PACKING_NEEDS_LOCAL, ModelConfig, ParallelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def te_available() -> bool:
    """Transformer Engine importable (it needs CUDA: its import fails without libcuda)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError or OSError (libcuda missing) on machines without a GPU
        return False
    return True


def use_transformer_engine(model: ModelConfig, te_present: bool | None = None) -> bool:
    te_present = te_available() if te_present is None else te_present
    wants_te = model.transformer_impl == "transformer_engine" or model.fp8 is not None
    if wants_te and not te_present:
        what = f"model.fp8={model.fp8}" if model.fp8 else "model.transformer_impl=transformer_engine"
        raise ValueError(f"{what} needs Transformer Engine, which is not importable here: on a CUDA machine "
                         f"run `pip install -e .[gpu]` (transformer-engine[pytorch]), or set "
                         f"model.transformer_impl=local and model.fp8=null")
    return model.transformer_impl != "local" and te_present


def padded_vocab_size(model: ModelConfig, tensor_model_parallel_size: int) -> int:
    """Vocab rounded up to a multiple of make_vocab_size_divisible_by x TP (Megatron's rule)."""
    multiple = model.make_vocab_size_divisible_by * tensor_model_parallel_size
    return int(math.ceil(model.vocab_size / multiple) * multiple)


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, *, use_te: bool, on_gpu: bool
) -> TransformerConfig:
    """The one translation from our config to megatron-core's TransformerConfig."""
    dtype = DTYPES[model.params_dtype]
    fp8 = {}
    if model.fp8:
        fp8 = {"fp8": model.fp8, "fp8_recipe": model.fp8_recipe, "fp8_margin": 0,
               "fp8_amax_history_len": 1024 if model.fp8_recipe == "delayed" else 1,
               "fp8_amax_compute_algo": "max" if model.fp8_recipe == "delayed" else "most_recent"}
    recompute = {}
    if model.recompute == "full":  # keep each layer's input only; recompute the layer in backward
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    elif model.recompute == "selective":  # recompute attention's core (no stored scores)
        recompute = {"recompute_granularity": "selective"}
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # Token-budget micro-batches differ in shape: pipeline stages exchange shapes before tensors.
        variable_seq_lengths=parallel.max_tokens_per_micro_batch > 0,
        # (megatron refuses variable lengths with its default MoE dispatcher; these models have no MoE)
        moe_token_dispatcher_type="alltoall" if parallel.max_tokens_per_micro_batch else "allgather",
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        attention_softmax_in_fp32=True,
        # Fused kernels come from TE/apex/CUDA: only on GPUs with TE.
        bias_activation_fusion=use_te,
        masked_softmax_fusion=use_te,
        persist_layer_norm=use_te,
        bias_dropout_fusion=use_te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Our losses are already normalised by global counts (algo.losses): megatron must neither
        # divide by the number of micro-batches nor average gradients over DP; it sums them.
        calculate_per_token_loss=True,
        # Interleaved schedule: Megatron-LM's default of overlapped, unbatched p2p. Batched p2p with
        # PP = 2 posts the forward activation and the backward gradient between the same two ranks
        # in opposite orders, which gloo matches FIFO (measured: swapped tensors, wrong loss);
        # the unbatched path orders them by rank parity on separate communicators.
        overlap_p2p_comm=parallel.virtual_pipeline_model_parallel_size is not None,
        batch_p2p_comm=parallel.virtual_pipeline_model_parallel_size is None,
        **fp8,
        **recompute,
    )


def layer_spec(model: ModelConfig, use_te: bool):
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm, fp8=model.fp8)
    return get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")


def build_gpt_models(
    model: ModelConfig, parallel: ParallelConfig, *, on_gpu: bool, te_present: bool | None = None
) -> list[GPTModel]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), after initialize_model_parallel."""
    use_te = use_transformer_engine(model, te_present)
    if use_te and parallel.sequence_packing:  # transformer_impl=auto chose TE here
        raise ValueError(PACKING_NEEDS_LOCAL)
    config = transformer_config(model, parallel, use_te=use_te, on_gpu=on_gpu)
    spec = layer_spec(model, use_te)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(model, parallel.tensor_model_parallel_size),
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,  # logits stay vocab-sharded: log-probs are computed vocab-parallel
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=stage,
        )
        if on_gpu:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks
