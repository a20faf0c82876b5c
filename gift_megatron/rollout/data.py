"""Prompt data: JSONL or Parquet rows -> token ids, with a length filter and resumable shuffling."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    prompt_ids: list[int]
    answer: str
    text: str
    row: int  # 1-based line (JSONL) or row (Parquet) in the source file


def _jsonl_line(path: Path, line_no: int, raw: bytes) -> str:
    """One line's text; a UTF-8 byte order mark on the first line is dropped (some Windows editors write one)."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as e:
        utf16 = line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        source = "utf-16" if utf16 else "cp1252"  # cp1252: the usual non-UTF-8 text (Windows, Latin-1)
        raise ValueError(f"{path}:{line_no}: not valid UTF-8{' (the file is UTF-16)' if utf16 else ''} "
                         f"({e.reason} at byte {e.start + 1} of the line: {raw[max(e.start - 20, 0):e.end + 20]!r}); "
                         f"re-encode the file as UTF-8, e.g. iconv -f {source} -t utf-8 IN > OUT") from None


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    """(1-based row, record) of every row; a string cell that is not UTF-8 names its row and column."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    try:
        return list(enumerate(table.to_pylist(), start=1))
    except UnicodeDecodeError:  # a string column holding non-UTF-8 bytes (written by another tool)
        _raise_on_bad_utf8_cell(path, table)
        raise


def _raise_on_bad_utf8_cell(path: Path, table) -> None:
    """The error naming the row and column of a string cell that does not decode (the slow path, on error only)."""
    for name in table.column_names:
        for row, value in enumerate(table.column(name), start=1):
            try:
                value.as_py()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{row}: column {name!r} is not valid UTF-8 ({e.reason}: {e.object[:40]!r}); "
                                 f"re-encode the column as UTF-8 text (decode its bytes with their codec, e.g. pandas "
                                 f".str.decode('cp1252'), and write the file again)") from None


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(1-based line or row, record) of every non-blank row; undecodable or malformed ones name file:line."""
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _jsonl_line(path, line_no, raw)
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg}); fix or remove the line") from None
    return rows


def _field(path: Path, row: int, record: Any, name: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{row}: expected an object with field {name!r}, got {type(record).__name__}")
    if name not in record:
        raise ValueError(f"{path}:{row}: no field {name!r} (fields: {sorted(record)}); set data.prompt_field / "
                         f"data.answer_field")
    value = record[name]
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"{path}:{row}: field {name!r} must be text, got {type(value).__name__}")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a JSON escape like \ud83d: half of a UTF-16 pair, e.g. text cut mid-emoji
        raise ValueError(f"{path}:{row}: field {name!r} holds a lone surrogate "
                         f"{text[e.start].encode('unicode_escape').decode()} at character {e.start + 1}, half of "
                         f"a character (text cut inside an emoji?): fix or remove it") from None
    return text


def encode_prompt(tokenizer, text: str, use_chat_template: bool) -> list[int]:
    if use_chat_template:  # render, then tokenize the text (the template carries its own special tokens)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    return list(tokenizer.encode(text))


def load_prompts(path: str | Path, tokenizer, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 use_chat_template: bool = False, max_prompt_length: int = 1024) -> list[Prompt]:
    """Every row as a tokenized Prompt; rows longer than max_prompt_length tokens are dropped (counted)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data.path={path} does not exist")
    prompts, too_long = [], 0
    rows = _rows(path)
    if not rows:
        raise ValueError(f"data.path={path} has no rows: give a JSONL/Parquet file with one prompt per row")
    for row, record in rows:
        text = _field(path, row, record, prompt_field)
        if not text.strip():
            raise ValueError(f"{path}:{row}: field {prompt_field!r} is empty; remove the row")
        answer = _field(path, row, record, answer_field)
        ids = encode_prompt(tokenizer, text, use_chat_template)
        if len(ids) > max_prompt_length:
            too_long += 1
            continue
        prompts.append(Prompt(ids, answer, text, row))
    log.info("%s: %d prompts kept, %d longer than data.max_prompt_length=%d dropped", path, len(prompts), too_long,
             max_prompt_length)
    if not prompts:
        raise ValueError(f"{path}: no prompt of at most data.max_prompt_length={max_prompt_length} tokens "
                         f"({len(rows)} rows, {too_long} too long): raise max_prompt_length")
    return prompts


class PromptSampler:
    """Indices of shuffled epochs (a fresh permutation per epoch from seed + epoch); resumable."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        return torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            take = order[self.position: self.position + k - len(out)].tolist()
            out += take
            self.position += len(take)
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data position is for {state['num_prompts']} prompts with seed "
                             f"{state['seed']}, this run has {self.num_prompts} with seed {self.seed}: resume with "
                             f"the same data and data.seed")
        self.epoch, self.position = state["epoch"], state["position"]
