"""A run's task: train and held-out prompts with their answers, tokenized (`build_task`).

The embedded default: 2-digit addition ("47+38=" -> "85"), verifiable, with held-out prompts and a
character-level tokenizer trained on its corpus. Reward 1 only for the exact answer followed by
end-of-sequence (an answer that does not stop cleanly, or any extra token, scores 0), checked on
token ids: no detokenization involved. Otherwise JSONL/Parquet prompt files (rollout/data.py) with
the model's own tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gift_megatron.config import DataConfig


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


def special_tokens(tokenizer) -> dict[str, int]:
    """bos / eos / pad ids for a model's config.json (pad and bos fall back to EOS)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def load_tokenizer(data: DataConfig, folder: Path):
    """The task's tokenizer: for addition, a character tokenizer trained on the problems (saved in
    `folder`); otherwise data.tokenizer (the model's own), which must have an EOS token."""
    if data.name == "addition":
        from gift_megatron.rollout.tokenizer import train_char_tokenizer

        train, held_out = addition_problems(data.seed, data.num_eval_prompts)
        return train_char_tokenizer(folder, corpus(train + held_out))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data.tokenizer)
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer={data.tokenizer} has no EOS token: completions could never stop")
    return tok


def build_task(data: DataConfig, vocab_size: int, folder: Path) -> TaskData:
    """Train and held-out samples, tokenized; `folder` keeps a trained tokenizer (addition)."""
    tok = load_tokenizer(data, folder / "tokenizer")
    special = special_tokens(tok)
    task = _addition_task(data, tok) if data.name == "addition" else _file_task(data, tok)
    task = TaskData(*task, special["eos_token_id"], special["pad_token_id"], tok)
    if len(tok) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but model.vocab_size={vocab_size}: use the "
                         f"model's own tokenizer (data.tokenizer)")
    return task


def _addition_task(data: DataConfig, tok) -> tuple[list[Sample], list[Sample]]:
    from gift_megatron.rollout.tokenizer import BOS

    train, held_out = addition_problems(data.seed, data.num_eval_prompts)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    samples = lambda ps: [Sample([BOS] + enc(p.prompt), enc(p.answer), p.answer, p.prompt) for p in ps]  # noqa: E731
    return samples(train), samples(held_out)


def _file_task(data: DataConfig, tok) -> tuple[list[Sample], list[Sample]]:
    """JSONL/Parquet prompts; held out: data.eval_path, else the first num_eval_prompts after a seeded shuffle."""
    from gift_megatron.rollout.data import load_prompts

    def load(path):
        rows = load_prompts(path, tok, prompt_field=data.prompt_field, answer_field=data.answer_field,
                            use_chat_template=data.use_chat_template, max_prompt_length=data.max_prompt_length)
        return [Sample(p.prompt_ids, tok.encode(p.answer, add_special_tokens=False), p.answer, p.text) for p in rows]

    rows = load(data.path)
    if data.eval_path:
        return rows, load(data.eval_path)
    if not 0 <= data.num_eval_prompts < len(rows):
        raise ValueError(f"data.num_eval_prompts={data.num_eval_prompts} must be in [0, {len(rows)}) for "
                         f"{data.path}, which has {len(rows)} rows (0: no evaluation; or give data.eval_path)")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(data.seed)).tolist()
    return [rows[i] for i in order[data.num_eval_prompts:]], [rows[i] for i in order[:data.num_eval_prompts]]
