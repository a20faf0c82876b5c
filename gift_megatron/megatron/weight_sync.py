"""Gather the policy's TP shards and PP stages into Hugging Face tensors on global rank 0.

Every trainer rank calls `gather_hf_weights`; rank 0 gets an iterator of (HF name, tensor) to feed
the engines (bucket by bucket, so the whole model never has to sit on rank 0 at once), the other
ranks an empty list once their part is sent. Per stage, TP shards are all-gathered and unsharded,
renamed through the same mapping table as checkpoint conversion (gift_megatron.convert.mapping),
and stages other than the first send theirs to rank 0 over the pipeline group: a name (bytes), a
shape and the data, as tensors (no pickling). DP replicas hold the same weights: only DP rank 0 sends.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from gift_megatron.config import ModelConfig
from gift_megatron.convert.mapping import LAYER_NAME, ModelMapping, canonical_name
from gift_megatron.megatron.model import padded_vocab_size

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _stage_params(chunks, mapping: ModelMapping) -> list[tuple[str, torch.Tensor]]:
    """This rank's parameters under canonical global names (local layer index -> global)."""
    out = []
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)
        global_index = {i: layer.layer_number - 1 for i, layer in enumerate(module.decoder.layers)}
        for name, param in module.named_parameters():
            name = LAYER_NAME.sub(lambda m, idx=global_index: f"decoder.layers.{idx[int(m[1])]}.{m[2]}", name)
            name = canonical_name(name)
            if name == "output_layer.weight" and name not in mapping.rules:
                continue  # tied embeddings: the last stage's copy of the word embeddings
            mapping.rule(name)  # every other parameter must be mapped (KeyError names it)
            out.append((name, param.detach()))
    return out


def _full_tensors(chunks, mapping: ModelMapping) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's canonical full (TP-unsharded) tensors; a collective over the TP group."""
    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    for name, local in _stage_params(chunks, mapping):
        if tp == 1 or mapping.rule(name).kind == "replicated":
            yield name, local
            continue
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=group)
        yield name, mapping.unshard(name, shards)


def _send(tensor: torch.Tensor, dst: int, group) -> None:
    dist.send(tensor.contiguous(), dst=dst, group=group)


def _send_named(name: str, tensor: torch.Tensor, dst: int, group) -> None:
    encoded = torch.tensor(list(name.encode()), dtype=torch.uint8)
    header = torch.tensor([encoded.numel(), _DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape],
                          dtype=torch.int64)
    _send(torch.tensor([header.numel()], dtype=torch.int64), dst, group)
    _send(header, dst, group)
    _send(encoded, dst, group)
    _send(tensor, dst, group)


def _recv_named(src: int, group) -> tuple[str, torch.Tensor]:
    n = torch.empty(1, dtype=torch.int64)
    dist.recv(n, src=src, group=group)
    header = torch.empty(int(n), dtype=torch.int64)
    dist.recv(header, src=src, group=group)
    name_len, dtype, ndim, shape = int(header[0]), _DTYPES[int(header[1])], int(header[2]), header[3:].tolist()
    assert len(shape) == ndim
    encoded = torch.empty(name_len, dtype=torch.uint8)
    dist.recv(encoded, src=src, group=group)
    data = torch.empty(shape, dtype=dtype)
    dist.recv(data, src=src, group=group)
    return bytes(encoded.tolist()).decode(), data


def _to_hf(mapping: ModelMapping, named: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, full in named:
        yield from mapping.to_hf(name, full).items()


def gather_hf_weights(chunks, model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]] | list:
    """Collective over all trainer ranks; see the module docstring."""
    mapping = ModelMapping.from_config(model, padded_vocab_size(model, ps.get_tensor_model_parallel_world_size()))
    if ps.get_data_parallel_rank() != 0:
        return []
    pp_group, pp_rank = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank()
    tp_rank = ps.get_tensor_model_parallel_rank()
    if pp_rank == 0 and tp_rank == 0:
        return _rank0_stream(chunks, mapping, pp_group)
    hf = _to_hf(mapping, _full_tensors(chunks, mapping))
    if tp_rank != 0:
        for _ in hf:  # take part in the TP all-gathers only
            pass
        return []
    first = dist.get_global_rank(pp_group, 0)
    named = list(hf)
    _send(torch.tensor([len(named)], dtype=torch.int64), first, pp_group)
    for name, tensor in named:
        _send_named(name, tensor, first, pp_group)
    return []


def _rank0_stream(chunks, mapping: ModelMapping, pp_group) -> Iterator[tuple[str, torch.Tensor]]:
    yield from _to_hf(mapping, _full_tensors(chunks, mapping))
    for stage in range(1, dist.get_world_size(pp_group)):
        src = dist.get_global_rank(pp_group, stage)
        count = torch.empty(1, dtype=torch.int64)
        dist.recv(count, src=src, group=pp_group)
        for _ in range(int(count)):
            yield _recv_named(src, pp_group)
