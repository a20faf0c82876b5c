"""Arithmetic prompt files for a real model: train and held-out JSONL that share no problem.

    python tools/make_arithmetic_data.py --op + --digits 2 2 --train 4000 --eval 500 --out data/add2

writes OUT/train.jsonl and OUT/eval.jsonl, rows {"prompt": "What is 47 + 38? Put the final answer in
\\boxed{}.", "answer": "85"}, for `data.name=jsonl data.use_chat_template=true` (the model's chat
template wraps the prompt) and the math_verify reward (the boxed answer, else the last number, must
equal the answer). Problems are drawn without replacement from every (a, b) with a of `--digits[0]`
digits and b of `--digits[1]`, seeded; held-out problems are never in the train file (nor their
commuted twin: b + a is the same problem to a model that has learned commutativity).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
INSTRUCTION = "Put the final answer in \\boxed{}."


def problems(op: str, digits: tuple[int, int], count: int, seed: int) -> list[tuple[int, int]]:
    """`count` distinct (a, b), a with digits[0] digits and b with digits[1], commuted twins collapsed."""
    lo = [10 ** (d - 1) if d > 1 else 0 for d in digits]
    hi = [10 ** d for d in digits]
    space = (hi[0] - lo[0]) * (hi[1] - lo[1])
    rng, seen, out = random.Random(seed), set(), []
    if count > space // 2:
        raise SystemExit(f"{count} problems asked of a space of {space} (about {space // 2} up to commuting): "
                         f"ask fewer or more digits")
    while len(out) < count:
        a, b = rng.randrange(lo[0], hi[0]), rng.randrange(lo[1], hi[1])
        key = (min(a, b), max(a, b)) if op in "+*" else (a, b)
        if key not in seen:
            seen.add(key)
            out.append((a, b))
    return out


def row(op: str, a: int, b: int) -> dict[str, str]:
    return {"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "answer": str(OPS[op](a, b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=sorted(OPS), default="+")
    ap.add_argument("--digits", type=int, nargs=2, default=[2, 2], metavar=("A", "B"))
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    drawn = problems(a.op, tuple(a.digits), a.train + a.eval, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", drawn[:a.eval]), ("train", drawn[a.eval:])):
        with open(a.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row(a.op, x, y)) + "\n" for x, y in part)
    print(f"{a.out}: {a.train} train and {a.eval} held-out problems ({a.op}, digits {a.digits[0]} and {a.digits[1]})")


if __name__ == "__main__":
    main()
