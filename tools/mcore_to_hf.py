"""Convert a megatron-core dist checkpoint (converted or a training checkpoint, any TP/PP) to Hugging Face.

    python tools/mcore_to_hf.py --ckpt runs/qwen2.5_32b_gift/checkpoints/step_00000200 --out /models/gift-32b

The model preset is found as model.yaml in or up to two folders above --ckpt (hf_to_mcore.py and
gift-train write it), or given with --model-config. The output folder (safetensors shards + index,
config.json, tokenizer files) loads with transformers and vLLM. Tensors are streamed one layer at a time.
"""

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_megatron.megatron.conversion import mcore_to_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="folder with the dist checkpoint's metadata.json")
    ap.add_argument("--out", required=True, help="output HF folder")
    ap.add_argument("--model-config", default=None, help="model preset YAML (default: model.yaml near --ckpt)")
    ap.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here (default: the preset's "
                                                           "hf_path)")
    ap.add_argument("--params-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="dtype of the written weights (default: the preset's params_dtype)")
    ap.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args()
    files = mcore_to_hf(a.ckpt, a.out, model_config=a.model_config, tokenizer_dir=a.tokenizer_dir,
                        params_dtype=a.params_dtype, max_shard_bytes=int(a.max_shard_size_gb * 2**30),
                        progress=not a.no_progress)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"wrote {len(files)} safetensors file(s) to {a.out}; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
