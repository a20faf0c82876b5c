"""Rewards: a math answer verifier (math-verify underneath), a Hugging Face reward model, the exact
answer check, composed by config (`reward.terms`: sum of weight x term), and DAPO's overlong
shaping on top (gift_megatron.algo.overlong_penalty).

Groups are scored by `GroupScorer` in a thread pool as each group's completions arrive, so with
servers the rewards of finished groups are computed while other groups are still generating.

math-verify bounds its parsing time with `signal.alarm`, which only works in the main thread: there
its timeouts are on; in other threads they are off (its documented switch) and the completion is
cut to `max_chars` first, so a pathological string cannot stall a worker thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from gift_megatron.config import RewardConfig
from gift_megatron.rollout.tasks import Sample, exact_answer_reward

log = logging.getLogger(__name__)
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_BOXED = "\\boxed"


def _boxed_contents(text: str) -> list[str]:
    """The content of every \\boxed{...} (nested braces allowed), in order; unbalanced ones are skipped."""
    out, start = [], text.find(_BOXED + "{")
    while start >= 0:
        i, depth = start + len(_BOXED) + 1, 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[i:j])
                break
        start = text.find(_BOXED + "{", start + 1)
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed), or None (none, or the last unbalanced)."""
    start = text.rfind(_BOXED + "{")
    boxes = _boxed_contents(text[start:]) if start >= 0 else []
    return boxes[0] if boxes else None


def _gsm8k_answer(line: str) -> str:
    """What follows '####': its one number ('18 dollars' -> '18', '$1,234' -> '1234'); LaTeX, words, or
    several numbers ('18 or 17': a hedge) as written, for the verifier to parse or reject."""
    line = line.strip()
    numbers = {n.replace(",", "") for n in _NUMBER.findall(line)}
    return numbers.pop() if len(numbers) == 1 and "\\" not in line else line


def final_answers(text: str, last_number: bool = True) -> list[str]:
    """Every final answer a solution states: each '#### N' and each \\boxed{}; when it states none
    (and `last_number`), its last number. Several that differ are a hedge, not an answer."""
    stated = [_gsm8k_answer(m) for m in _GSM8K.findall(text)] + [b.strip() for b in _boxed_contents(text)]
    stated = [a for a in stated if a]
    if stated or not last_number:
        return stated
    numbers = _NUMBER.findall(text)
    return [numbers[-1].replace(",", "")] if numbers else []


def extract_answer(text: str, last_number: bool = True) -> str | None:
    """The one final answer of a solution (see `final_answers`); None when it states none, or
    several that differ as written (the verifier compares those mathematically)."""
    answers = set(final_answers(text, last_number))
    return answers.pop() if len(answers) == 1 else None


class MathVerifier:
    """1.0 when the completion's final answer equals the reference (mathematically), else 0.0."""

    def __init__(self, correct: float = 1.0, wrong: float = 0.0, timeout_s: int = 5, max_chars: int = 4000):
        self.correct, self.wrong, self.timeout_s, self.max_chars = correct, wrong, timeout_s, max_chars
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call without timeouts

    def score(self, completion: str, reference: str) -> float:
        """Correct only if the completion states at least one final answer and every one it states
        equals the reference: hedging ('\\boxed{A} or \\boxed{B}') scores as wrong."""
        from math_verify import parse, verify

        answers = final_answers(completion[-self.max_chars:])
        gold = extract_answer(reference, last_number=False) or reference.strip()  # a bare reference is the answer
        if not answers:
            return self.wrong
        main = threading.current_thread() is threading.main_thread()
        timeout = self.timeout_s if main else None
        gold_parsed = None
        for answer in dict.fromkeys(answers):  # each distinct one, in order
            try:
                gold_parsed = gold_parsed or parse(f"${gold}$", parsing_timeout=timeout)
                ok = verify(gold_parsed, parse(f"${answer}$", parsing_timeout=timeout), timeout_seconds=timeout)
            except Exception:  # math-verify raises on unparsable input or a timeout: not a correct answer
                ok = False
            if not ok:
                return self.wrong
        return self.correct

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


Term = Callable[[list, Sample], torch.Tensor]  # (completions of one group, its sample) -> [G] rewards


class CompositeReward:
    """sum_i weight_i x term_i per group; the per-term values are kept for logging."""

    def __init__(self, terms: list[tuple[str, float, Term]], accuracy: Term, accuracy_kind: str) -> None:
        if not terms:
            raise ValueError("reward.terms is empty after defaults: give at least one term")
        self.terms, self.accuracy, self.accuracy_kind = terms, accuracy, accuracy_kind

    def score_group(self, completions: list, sample: Sample) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {kind: term(completions, sample).float() for kind, _, term in self.terms}
        for kind, values in parts.items():
            if not torch.isfinite(values).all():
                raise ValueError(f"reward term {kind!r} returned {values.tolist()} for the prompt {sample.prompt!r}: "
                                 f"rewards must be finite (for a reward model: check its weights and path)")
        total = sum(weight * parts[kind] for kind, weight, _ in self.terms)
        return total, parts


def build_reward(cfg: RewardConfig, *, task: str, eos_id: int, decode: Callable[[list[int]], str]) -> CompositeReward:
    """The configured terms; an empty list means the task's own check (exact for the addition task,
    math_verify for JSONL/Parquet prompts). Accuracy (eval) is that check, whatever the terms."""
    from gift_megatron.config import RewardTermConfig

    verifier = MathVerifier()

    def exact(comps, sample):
        return torch.tensor([exact_answer_reward(c.token_ids, sample.answer_ids, eos_id) for c in comps])

    def math(comps, sample):
        return verifier.score_batch([decode(c.token_ids) for c in comps], [sample.answer] * len(comps))

    def make(term: RewardTermConfig) -> Term:
        if term.kind == "exact":
            return exact
        if term.kind == "math_verify":
            return math
        model = RewardModel(term.path, device=term.device, batch_size=term.batch_size)
        lock = threading.Lock()  # one model, scored from the pool's threads one batch at a time

        def reward_model(comps, sample):
            with lock:
                return model.score_batch([sample.prompt + decode(c.token_ids) for c in comps])
        return reward_model

    check = "exact" if task == "addition" else "math_verify"
    terms = cfg.terms or [RewardTermConfig(kind=check)]
    return CompositeReward([(t.kind, t.weight, make(t)) for t in terms], exact if check == "exact" else math, check)


class GroupScorer:
    """Scores groups on worker threads as they arrive; `results()` waits for all, in prompt order."""

    def __init__(self, reward: CompositeReward, num_workers: int) -> None:
        self.reward, self.pool = reward, ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="reward")

    def score_all(self, arrivals: Iterable[tuple[int, list]], samples: list[Sample]):
        """`arrivals`: (prompt index, completions) in any order. Returns (groups, totals [P*G], parts)."""
        futures: dict[int, Future] = {}
        groups: dict[int, list] = {}
        for j, comps in arrivals:
            groups[j] = comps
            futures[j] = self.pool.submit(self.reward.score_group, comps, samples[j])
        order = sorted(groups)
        if order != list(range(len(samples))):
            raise RuntimeError(f"the engine returned groups {order} for {len(samples)} prompts")
        scored = [futures[j].result() for j in order]
        totals = torch.cat([t for t, _ in scored])
        parts = {k: torch.cat([p[k] for _, p in scored]) for k in scored[0][1]} if scored else {}
        return [groups[j] for j in order], totals, parts

    def close(self) -> None:
        self.pool.shutdown(wait=True)
