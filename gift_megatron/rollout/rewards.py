"""Rewards: a math answer verifier (math-verify underneath), a Hugging Face reward model, and
DAPO's overlong shaping on top (gift_megatron.algo.overlong_penalty).

math-verify bounds its parsing time with `signal.alarm`, which only works in the main thread: there
its timeouts are on; in other threads they are off (its documented switch) and the completion is
cut to `max_chars` first, so a pathological string cannot stall a worker thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)
_GSM8K = re.compile(r"####\s*([^\n]+)")
_BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    i, depth = start + len(_BOXED) + 1, 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: malformed


def extract_answer(text: str, last_number: bool = True) -> str | None:
    """The final answer of a solution: GSM8K's '#### N', else the last \\boxed{}, else (if
    `last_number`) the last number in the text."""
    m = _GSM8K.findall(text)
    if m:
        return m[-1].strip().replace(",", "")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if not last_number:
        return None
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "") if numbers else None


class MathVerifier:
    """1.0 when the completion's final answer equals the reference (mathematically), else 0.0."""

    def __init__(self, correct: float = 1.0, wrong: float = 0.0, timeout_s: int = 5, max_chars: int = 4000):
        self.correct, self.wrong, self.timeout_s, self.max_chars = correct, wrong, timeout_s, max_chars
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call without timeouts

    def score(self, completion: str, reference: str) -> float:
        from math_verify import parse, verify

        answer = extract_answer(completion[-self.max_chars:])
        gold = extract_answer(reference, last_number=False) or reference.strip()  # a bare reference is the answer
        if answer is None:
            return self.wrong
        main = threading.current_thread() is threading.main_thread()
        timeout = self.timeout_s if main else None
        try:
            ok = verify(parse(f"${gold}$", parsing_timeout=timeout), parse(f"${answer}$", parsing_timeout=timeout),
                        timeout_seconds=timeout)
        except Exception:  # math-verify raises on unparsable input or a timeout: not a correct answer
            ok = False
        return self.correct if ok else self.wrong

    def score_batch(self, completions: Sequence[str], references: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.score(c, r) for c, r in zip(completions, references)], dtype=torch.float32)


class RewardModel:
    """A Hugging Face sequence classifier (e.g. a Skywork-Reward-style model): one scalar per text."""

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = 16, max_length: int = 4096,
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    @torch.no_grad()
    def score_batch(self, texts: Sequence[str]) -> torch.Tensor:
        scores = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length).to(self.device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)
