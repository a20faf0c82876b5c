"""Score a Hugging Face model folder on a JSONL prompt file with plain vLLM (nothing of the trainer's
engine, sync or evaluation code): greedy pass@1 and, with --samples k, avg@k and pass@k at a temperature,
each with its standard error over prompts.

    python tools/score_hf_model.py --hf-dir /models/gift-export --data data/add2/eval.jsonl --samples 4

The prompt is the row's `prompt` in the model's chat template; the reward is the trainer's math
verifier (gift_megatron/rollout/rewards.py: the boxed answer, else the last number, equals `answer`).
Used to choose a real task by the model's starting accuracy and to check that an exported model
scores what the trainer measured (docs/real_model.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def _se(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(n - 1, 1) / n)


def load(hf_dir: Path, seed: int):
    """Plain vLLM on the folder, and its tokenizer."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM

    from gift_megatron.rollout.engine import chunked_prefill

    llm = LLM(model=str(hf_dir), dtype="float32", seed=seed, enforce_eager=not torch.cuda.is_available(),
              max_model_len=1024, enable_chunked_prefill=chunked_prefill())
    return llm, AutoTokenizer.from_pretrained(str(hf_dir))


def score(llm, tok, rows: list[dict], *, samples: int, temperature: float, max_new_tokens: int,
          seed: int) -> dict[str, float]:
    from vllm import SamplingParams

    from gift_megatron.rollout.rewards import MathVerifier

    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False) for r in rows]
    verifier = MathVerifier()
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    hits = [verifier.score(o.outputs[0].text, r["answer"]) for o, r in zip(greedy, rows)]
    out = {"prompts": len(rows), "pass@1": sum(hits) / len(hits), "pass@1_se": _se(hits)}
    if samples > 1:
        params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        sampled = llm.generate(prompts, params, use_tqdm=False)
        per = [[verifier.score(c.text, r["answer"]) for c in o.outputs] for o, r in zip(sampled, rows)]
        avg, any_ = [sum(p) / len(p) for p in per], [max(p) for p in per]
        out |= {f"avg@{samples}": sum(avg) / len(avg), f"avg@{samples}_se": _se(avg),
                f"pass@{samples}": sum(any_) / len(any_), f"pass@{samples}_se": _se(any_)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", type=Path, required=True)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="JSONL files with prompt and answer")
    ap.add_argument("--limit", type=int, default=0, help="the first N rows of each file (0: all)")
    ap.add_argument("--samples", type=int, default=4, help="k for avg@k and pass@k (1: greedy only)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    llm, tok = load(a.hf_dir, a.seed)
    for path in a.data:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = rows[:a.limit] if a.limit else rows
        result = score(llm, tok, rows, samples=a.samples, temperature=a.temperature,
                       max_new_tokens=a.max_new_tokens, seed=a.seed)
        print(json.dumps({"data": str(path), **{k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in result.items()}}), flush=True)


if __name__ == "__main__":
    main()
