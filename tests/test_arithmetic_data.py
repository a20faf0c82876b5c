"""tools/make_arithmetic_data.py: train and held-out problems never overlap (nor commuted twins), answers are
right, the files are what `data.name=jsonl` reads."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_held_out_problems_are_never_trained_and_answers_are_right(tmp_path):
    out = tmp_path / "add"
    subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--op", "+", "--digits", "2", "2", "--train",
                    "3000", "--eval", "500", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    train, held = _rows(out / "train.jsonl"), _rows(out / "eval.jsonl")
    assert (len(train), len(held)) == (3000, 500)

    def key(row):
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").split("?")[0].split(" + "))
        assert 10 <= a <= 99 and 10 <= b <= 99 and int(row["answer"]) == a + b
        assert row["prompt"].endswith("Put the final answer in \\boxed{}.")
        return min(a, b), max(a, b)

    train_keys, held_keys = {key(r) for r in train}, {key(r) for r in held}
    assert len(train_keys) == 3000 and len(held_keys) == 500 and not train_keys & held_keys


def test_products_and_a_space_too_small_is_refused(tmp_path):
    out = tmp_path / "mul"
    subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--op", "*", "--digits", "2", "1", "--train",
                    "200", "--eval", "50", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    for row in _rows(out / "eval.jsonl"):
        a, b = (int(x) for x in row["prompt"].removeprefix("What is ").split("?")[0].split(" * "))
        assert int(row["answer"]) == a * b
    small = subprocess.run([sys.executable, "tools/make_arithmetic_data.py", "--digits", "1", "1", "--train", "100",
                            "--eval", "10", "--out", str(tmp_path / "small")], cwd=ROOT, capture_output=True, text=True)
    assert small.returncode != 0 and "ask fewer or more digits" in small.stderr
