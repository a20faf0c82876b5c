"""HF folder <-> megatron dist checkpoint, tensor by tensor (the logic behind tools/*_to_*.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemReader
from tqdm import tqdm

from gift_megatron.config import ModelConfig
from gift_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf
from gift_megatron.convert.mapping import ModelMapping
from gift_megatron.convert.safetensors_io import HFReader, HFWriter
from gift_megatron.manifest import CorruptCheckpoint, verify_folder
from gift_megatron.megatron.checkpoint import write_checkpoint_manifest
from gift_megatron.megatron.hf_checkpoint import init_single_process, iter_full_tensors, save_streaming
from gift_megatron.megatron.model import DTYPES, padded_vocab_size
from gift_megatron.run_dir import LOCK_NAME, RunLock

log = logging.getLogger(__name__)
PRESET = "model.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "added_tokens.json", "chat_template.jinja")


def _check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    for name in ("num_attention_heads", "num_query_groups"):
        if getattr(model, name) % tp:
            raise ValueError(f"--tensor-model-parallel-size {tp} does not divide {name}={getattr(model, name)}: "
                             f"pick a divisor")
    if model.num_layers % pp:
        raise ValueError(f"--pipeline-model-parallel-size {pp} does not divide num_layers={model.num_layers}")


def write_preset(model: ModelConfig, path: Path) -> None:
    path.write_text("# Written by tools/hf_to_mcore.py: a model/ preset for gift-train.\n"
                    + yaml.safe_dump(dataclasses.asdict(model), sort_keys=False))


def read_preset(path: Path) -> ModelConfig:
    data = OmegaConf.to_container(OmegaConf.load(path))
    return ModelConfig(**data)


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, *, tensor_model_parallel_size: int = 1,
                pipeline_model_parallel_size: int = 1, params_dtype: str | None = None,
                progress: bool = True) -> ModelConfig:
    """Convert; returns the model preset (also written to OUT/model.yaml, HF config/tokenizer to OUT/hf/).
    OUT is locked while it is written (run_dir.RunLock): a second conversion into it is refused."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model = model_config_from_hf(hf_dir, **({"params_dtype": params_dtype} if params_dtype else {}))
    _check_layout(model, tensor_model_parallel_size, pipeline_model_parallel_size)
    if out_dir.exists() and any(p.name != LOCK_NAME for p in out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty: choose a new output folder")
    with RunLock(out_dir).acquire(f"hf_to_mcore {hf_dir}"):
        if any(p.name != LOCK_NAME for p in out_dir.iterdir()):  # another conversion got there first
            raise ValueError(f"{out_dir} is not empty: choose a new output folder")
        return _convert(hf_dir, out_dir, model, tensor_model_parallel_size, progress)


def _convert(hf_dir: Path, out_dir: Path, model: ModelConfig, tensor_model_parallel_size: int,
             progress: bool) -> ModelConfig:
    padded = padded_vocab_size(model, tensor_model_parallel_size)
    mapping = ModelMapping.from_config(model, padded)
    reader = HFReader(hf_dir)
    unused = sorted(set(reader.names()) - set(mapping.hf_names()) - {"lm_head.weight"})
    if unused:
        raise ValueError(f"{hf_dir}: tensors {unused[:5]} are not part of a {model.arch} model: unsupported "
                         f"architecture variant or a config.json that does not match the weights")
    for name in mapping.hf_names():  # every tensor present with the right shape, before writing anything
        mapping.check_hf_shape(name, reader.shape(name), f"{hf_dir}: ")
    bar = tqdm(total=len(mapping.rules), desc="hf -> mcore", unit="tensor", disable=not progress)

    def materialize(name: str):
        hf = [reader.get(h) for h in mapping.rule(name).hf]
        bar.update(1)
        return mapping.to_mcore(name, hf).to(DTYPES[model.params_dtype])

    init_single_process()
    tmp = out_dir / ".weights.tmp"  # renamed when complete: a crash never leaves a loadable half checkpoint
    save_streaming(tmp, model, padded, materialize)
    write_checkpoint_manifest(tmp)
    bar.close()
    tmp.rename(out_dir / "weights")
    (out_dir / "hf").mkdir()
    for f in ("config.json", *TOKENIZER_FILES):
        if (hf_dir / f).exists():
            shutil.copy2(hf_dir / f, out_dir / "hf" / f)
    model = dataclasses.replace(model, hf_path=str((out_dir / "hf").resolve()),
                                init_checkpoint=str((out_dir / "weights").resolve()))
    write_preset(model, out_dir / PRESET)
    return model


def find_preset(ckpt_dir: Path) -> Path:
    """model.yaml in the checkpoint folder or up to two levels above (converted or training checkpoints)."""
    for folder in (ckpt_dir, ckpt_dir.parent, ckpt_dir.parent.parent):
        if (folder / PRESET).exists():
            return folder / PRESET
    raise ValueError(f"no {PRESET} found in or above {ckpt_dir}: pass --model-config PATH")


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, model_config: str | Path | None = None,
                tokenizer_dir: str | Path | None = None, params_dtype: str | None = None,
                max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> list[Path]:
    """Convert any dist checkpoint (converted or training, any TP/PP) to a HF folder."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if not (ckpt_dir / "metadata.json").exists():
        raise ValueError(f"{ckpt_dir} is not a megatron dist checkpoint (no metadata.json): pass the folder that "
                         f"holds it (e.g. OUT/weights or RUN/checkpoints/step_XXXXXXXX)")
    if problems := verify_folder(ckpt_dir):  # no unverified load: a missing manifest is a problem too
        raise CorruptCheckpoint(f"checkpoint {ckpt_dir} is damaged:\n  " + "\n  ".join(problems) +
                                "\nconvert an older checkpoint of the run (tools/verify_checkpoint.py lists them)")
    model = read_preset(Path(model_config) if model_config else find_preset(ckpt_dir))
    dtype = DTYPES[params_dtype or model.params_dtype]
    init_single_process()
    rows = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata["embedding.word_embeddings.weight"]
    mapping = ModelMapping.from_config(model, rows.size[0])
    writer = HFWriter(out_dir, max_shard_bytes)
    for name, full in tqdm(iter_full_tensors(ckpt_dir, mapping), total=len(mapping.rules), desc="mcore -> hf",
                           unit="tensor", disable=not progress):
        for hf_name, tensor in mapping.to_hf(name, full).items():
            writer.add(hf_name, tensor.to(dtype))
    files = writer.close()
    written = dataclasses.replace(model, params_dtype=params_dtype or model.params_dtype)
    (out_dir / "config.json").write_text(json.dumps(hf_config_from_model(written), indent=2))
    tok = Path(tokenizer_dir) if tokenizer_dir else Path(model.hf_path) if model.hf_path else None
    for f in TOKENIZER_FILES:
        if tok is not None and (tok / f).exists():
            shutil.copy2(tok / f, out_dir / f)
    return files
