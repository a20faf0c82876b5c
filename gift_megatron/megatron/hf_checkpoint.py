"""Streaming between Hugging Face tensors and megatron-core dist checkpoints (torch_dist format).

Writing: megatron-core describes the checkpoint (keys, global shapes, per-layer chunks, the SwiGLU
split) from a model built on the meta device, so nothing is allocated; PyTorch DCP's file writer
then asks for each chunk in turn and `materialize` builds it from the HF tensors right then. Peak
memory is a few tensors, not the model. The result is an ordinary megatron dist checkpoint: it loads
into any TP/PP layout (dist_checkpointing reshards).

Reading: one layer at a time, PyTorch DCP reads exactly that layer's chunk of each stacked tensor.
Works for training checkpoints too (their optimizer state is simply not read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from gift_megatron.config import ModelConfig, ParallelConfig
from gift_megatron.convert.mapping import LAYER_NAME, ModelMapping
from gift_megatron.megatron.model import build_gpt_models

Materialize = Callable[[str], torch.Tensor]  # canonical megatron name -> full (TP = 1) tensor


def _checkpoint_key(name: str) -> tuple[str, int | None]:
    """Canonical per-layer name -> (dist-checkpoint key, layer index); layers are stacked on axis 0."""
    m = LAYER_NAME.match(name)
    return (f"decoder.layers.{m.group(2)}", int(m.group(1))) if m else (name, None)


class _LazyPlanner(MCoreSavePlanner):
    """Builds each tensor chunk only when the file writer asks for it."""

    def __init__(self, chunk_fn, **kwargs) -> None:
        super().__init__(**kwargs)
        self._chunk_fn = chunk_fn

    def resolve_data(self, write_item):
        if write_item.type != WriteItemType.BYTE_IO:
            obj = self.lookup_object(write_item.index)
            if obj.is_meta:
                return self._chunk_fn(write_item.index.fqn, tuple(write_item.index.offset), tuple(obj.shape),
                                      obj.dtype)
        return super().resolve_data(write_item)


class _StreamingStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save, but through DCP's streaming FileSystemWriter and the lazy planner."""

    def __init__(self, chunk_fn) -> None:
        super().__init__("torch_dist", 1)
        self._chunk_fn = chunk_fn

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        dcp.save(pyt_state_dict, storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=_LazyPlanner(self._chunk_fn, dedup_replicated_tensors=False, flatten_state_dict=False))


class _ChunkMaker:
    """(checkpoint key, chunk offset, chunk shape) -> that chunk of the full tensor (last one cached)."""

    def __init__(self, materialize: Materialize) -> None:
        self.materialize = materialize
        self._cached: tuple[str, torch.Tensor] | None = None

    def __call__(self, key: str, offset: tuple, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        layered = key.startswith("decoder.layers.")
        name = f"decoder.layers.{offset[0]}.{key[len('decoder.layers.'):]}" if layered else key
        if self._cached is None or self._cached[0] != name:
            self._cached = (name, self.materialize(name).to(dtype))
        full = self._cached[1]
        inner_offset, inner_shape = (offset[1:], shape[1:]) if layered else (offset, shape)
        chunk = full
        for dim, (start, size) in enumerate(zip(inner_offset, inner_shape)):
            chunk = chunk.narrow(dim, start, size)
        return chunk.reshape(shape).contiguous()


def save_streaming(out_dir: str | Path, model: ModelConfig, padded_vocab: int, materialize: Materialize) -> None:
    """Write a model-only dist checkpoint; `materialize(name)` gives each full tensor on demand.

    Needs torch.distributed and megatron's parallel state initialised (one process is enough).
    """
    structure = ModelConfig(**{**model.__dict__, "vocab_size": padded_vocab, "make_vocab_size_divisible_by": 1,
                               "fp8": None, "transformer_impl": "local"})
    with torch.device("meta"):
        (chunk,) = build_gpt_models(structure, ParallelConfig(), on_gpu=False, te_present=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(chunk.sharded_state_dict(), str(out_dir),
                            sharded_strategy=_StreamingStrategy(_ChunkMaker(materialize)))


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads exactly the requested chunk of each tensor (e.g. one layer of a stacked [L, ...] tensor)."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__()
        self.requests = requests  # checkpoint key -> (chunk offsets, destination tensor of the chunk's shape)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


def _request(name: str, metadata) -> tuple[str, tuple[tuple[int, ...], torch.Tensor]]:
    key, layer = _checkpoint_key(name)
    if key not in metadata:
        raise ValueError(f"tensor {name!r} (key {key!r}) is not in the checkpoint: was it written for another "
                         f"architecture (e.g. Qwen2 biases, Qwen3 QK-norm, tied embeddings)? Check the model config")
    md = metadata[key]
    size = tuple(md.size)
    if layer is None:
        return key, ((0,) * len(size), torch.empty(size, dtype=md.properties.dtype))
    return key, ((layer,) + (0,) * (len(size) - 1), torch.empty((1, *size[1:]), dtype=md.properties.dtype))


def iter_full_tensors(ckpt_dir: str | Path, mapping: ModelMapping) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, full TP = 1 tensor) for every tensor of the mapping, one layer at a time.

    Plain PyTorch DCP reads: megatron's loader wants every chunk of a tensor covered by some rank,
    which one process reading one layer is not.
    """
    reader = FileSystemReader(str(ckpt_dir))
    metadata = reader.read_metadata().state_dict_metadata
    by_layer: dict[int | None, list[str]] = {}
    for name in mapping.rules:
        by_layer.setdefault(_checkpoint_key(name)[1], []).append(name)
    for layer, names in by_layer.items():
        requests = dict(_request(name, metadata) for name in names)
        dcp.load({}, storage_reader=FileSystemReader(str(ckpt_dir)), planner=_ChunkLoadPlanner(requests))
        for name in names:
            full = requests[_checkpoint_key(name)[0]][1]
            yield name, full[0] if layer is not None else full


def init_single_process() -> None:
    """One-process torch.distributed + megatron parallel state, for the conversion tools."""
    import torch.distributed as dist

    from gift_megatron.megatron.parallel import init_model_parallel, loopback_store

    if not dist.is_initialized():  # its store listens on 127.0.0.1 only
        dist.init_process_group("gloo", store=loopback_store(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(ParallelConfig(), seed=0, on_gpu=False)
