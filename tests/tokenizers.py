"""A small real tokenizer built in the test (gift_megatron.rollout.tokenizer on a tiny corpus)."""

from __future__ import annotations

from pathlib import Path

from gift_megatron.rollout.tokenizer import train_char_tokenizer

CORPUS = [f"{a}+{b}={a + b}" for a in range(100) for b in range(0, 100, 7)] + [
    "a much longer text with letters x y z", "the answer is #### 72", "\\boxed{1/2}"]


def save_char_tokenizer(folder: str | Path) -> None:
    train_char_tokenizer(folder, CORPUS, vocab_size=48)
