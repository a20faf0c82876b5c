"""Streaming reads and writes of Hugging Face safetensors checkpoints (single file or sharded + index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


class HFReader:
    """Tensor-by-tensor access to a HF folder; only the requested tensor is read into memory."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._handles: dict[str, object] = {}
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{self.folder}: no *.safetensors files (and no {INDEX}): "
                                 f"point at a Hugging Face model folder saved with safetensors")
            weight_map = {}
            for f in files:
                for name in self._open(f.name).keys():
                    weight_map[name] = f.name
        self.weight_map: dict[str, str] = weight_map

    def _open(self, file: str):
        if file not in self._handles:
            path = self.folder / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: cannot read safetensors file ({e}); re-download or re-save it") from e
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape from the file header (no data read)."""
        self._check_present(name)
        return tuple(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def _check_present(self, name: str) -> None:
        if name not in self.weight_map:
            raise ValueError(f"{self.folder}: tensor {name!r} is missing from the checkpoint; is the model "
                             f"the architecture its config.json names, and is every shard present?")

    def get(self, name: str) -> torch.Tensor:
        self._check_present(name)
        file = self.weight_map[name]
        try:
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{self.folder / file}: cannot read tensor {name!r} ({e}); the file is corrupted "
                             f"or truncated: re-download or re-save it") from e


class HFWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes`, then the index."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 2**30) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size

    def _flush(self) -> None:
        save_file(self._pending, str(self.folder / f".shard-{len(self._shards):05d}.safetensors"),
                  metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(self.folder / f".shard-{i:05d}.safetensors", self.folder / final)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            (self.folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        return [self.folder / f for f in names]
