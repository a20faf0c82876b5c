"""Convert a Hugging Face Llama / Qwen2 / Qwen2.5 / Qwen3 folder to a megatron-core dist checkpoint.

    python tools/hf_to_mcore.py --hf-dir /models/Qwen2.5-32B --out /ckpt/qwen2.5-32b \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2

Writes OUT/weights/ (the dist checkpoint; it loads into any TP/PP layout that divides the model),
OUT/model.yaml (the model preset: pass it to gift-train as a model/ config, its init_checkpoint
points at OUT/weights) and OUT/hf/ (config.json and tokenizer files, for vLLM and the tokenizer).
Tensors are read, converted and written one at a time: peak memory stays near the largest tensor.
"""

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_megatron.megatron.conversion import hf_to_mcore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF model folder: config.json + *.safetensors (single or "
                                                     "sharded with model.safetensors.index.json)")
    ap.add_argument("--out", required=True, help="new (or empty) output folder")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1,
                    help="TP size the checkpoint is trained at: sets the vocabulary padding and is checked "
                         "against the head counts")
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                    help="PP size the checkpoint is trained at (checked against the layer count)")
    ap.add_argument("--params-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of the written weights (default: the HF config's dtype)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args()
    model = hf_to_mcore(a.hf_dir, a.out, tensor_model_parallel_size=a.tensor_model_parallel_size,
                        pipeline_model_parallel_size=a.pipeline_model_parallel_size, params_dtype=a.params_dtype,
                        progress=not a.no_progress)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"wrote {a.out}: {model.arch}, {model.num_layers} layers, hidden {model.hidden_size}; "
          f"peak RSS {peak:.0f} MiB\ntrain it on a GSM8K-style file: gift-train experiment=hf_math "
          f"model_preset={Path(a.out).resolve() / 'model.yaml'} data.path=/path/to/train.jsonl")


if __name__ == "__main__":
    main()
