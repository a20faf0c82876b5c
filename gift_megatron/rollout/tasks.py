"""The embedded default's task: 2-digit addition ("47+38=" -> "85"), verifiable, with held-out prompts.

Reward 1 only for the exact answer followed by end-of-sequence (an answer that does not stop
cleanly, or any extra token, scores 0), checked on token ids: no detokenization involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sample:
    """One prompt as the trainer sees it."""

    prompt_ids: list[int]
    answer_ids: list[int]  # the reference answer's tokens (exact reward, supervised warm-up)
    answer: str  # the reference answer's text (math_verify)
    prompt: str  # the prompt's text (a reward model scores prompt + completion)


@dataclass
class TaskData:
    train: list[Sample]
    eval: list[Sample]
    eos_id: int
    pad_id: int
    tokenizer: object

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos_id], skip_special_tokens=True)


@dataclass(frozen=True)
class Problem:
    prompt: str  # "47+38="
    answer: str  # "85"


def addition_problems(seed: int, num_eval: int) -> tuple[list[Problem], list[Problem]]:
    """All 8100 pairs of 2-digit numbers, shuffled by `seed`: (train, held-out) with num_eval held out."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    problems = [Problem(f"{pairs[i][0]}+{pairs[i][1]}=", str(pairs[i][0] + pairs[i][1])) for i in order]
    if not 0 < num_eval < len(problems):
        raise ValueError(f"data.num_eval_prompts={num_eval} must be in (0, {len(problems)})")
    return problems[num_eval:], problems[:num_eval]


def corpus(problems: list[Problem]) -> list[str]:
    """Texts for the tokenizer and the supervised warm-up: prompt + answer."""
    return [p.prompt + p.answer for p in problems]


def exact_answer_reward(completion_ids: list[int], answer_ids: list[int], eos_id: int) -> float:
    """1.0 iff the completion is exactly the answer's tokens followed by EOS."""
    return 1.0 if list(completion_ids) == list(answer_ids) + [eos_id] else 0.0
