"""Prompt data: JSONL/Parquet fields, chat template, length filter, errors with file:line, resumable order."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gift_megatron.rollout.data import PromptSampler, load_prompts
from tests.tokenizers import save_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}=>{% endif %}")
    return tok


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_fields_filter_and_chat_template(tmp_path, tokenizer):
    f = _jsonl(tmp_path / "p.jsonl", [{"question": "1+2=", "answer": "#### 3"}, {"question": "12+13=", "answer": 25},
                                      "", {"question": "9" * 40, "answer": "x"}])
    prompts = load_prompts(f, tokenizer, prompt_field="question", answer_field="answer", max_prompt_length=20)
    assert [p.text for p in prompts] == ["1+2=", "12+13="]  # the 40-digit one is too long; blank lines skipped
    assert [p.row for p in prompts] == [1, 2] and prompts[1].answer == "25"
    assert prompts[0].prompt_ids == tokenizer.encode("1+2=")
    chat = load_prompts(f, tokenizer, prompt_field="question", use_chat_template=True, max_prompt_length=100)
    assert chat[0].prompt_ids == tokenizer.encode("<user>1+2==>", add_special_tokens=False)  # rendered template


def test_parquet(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["3+4=", "5+6="], "answer": ["7", "11"]}), tmp_path / "p.parquet")
    prompts = load_prompts(tmp_path / "p.parquet", tokenizer)
    assert [(p.text, p.answer, p.row) for p in prompts] == [("3+4=", "7", 1), ("5+6=", "11", 2)]


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "1+1=", "answer": "2"}, "{not json"], "p.jsonl:2: malformed JSON"),
    ([{"question": "1+1=", "answer": "2"}], "p.jsonl:1: no field 'prompt' (fields: ['answer', 'question'])"),
    ([{"prompt": "  ", "answer": "2"}], "p.jsonl:1: field 'prompt' is empty"),
    ([{"prompt": ["1+1="], "answer": "2"}], "p.jsonl:1: field 'prompt' must be text, got list"),
    (["[1, 2]"], "p.jsonl:1: expected an object with field 'prompt', got list"),
    ([{"prompt": "9" * 40, "answer": "2"}], "no prompt of at most data.max_prompt_length=10 tokens"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, rows, message):
    with pytest.raises(ValueError) as err:
        load_prompts(_jsonl(tmp_path / "p.jsonl", rows), tokenizer, max_prompt_length=10)
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="data.path=.*nope.jsonl does not exist"):
        load_prompts(tmp_path / "nope.jsonl", tokenizer)


def test_empty_file_says_it_has_no_rows(tmp_path, tokenizer):
    """An empty file used to be reported as "raise max_prompt_length"."""
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n\n")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"data.path=.*{name} has no rows"):
            load_prompts(tmp_path / name, tokenizer)


def test_sampler_is_deterministic_covers_epochs_and_resumes():
    a = PromptSampler(10, seed=3)
    first = a.next(4) + a.next(4) + a.next(4)  # crosses into the second epoch
    assert sorted(first[:10]) == list(range(10))  # an epoch is a permutation
    b = PromptSampler(10, seed=3)
    b.next(4)
    state = b.state_dict()
    c = PromptSampler(10, seed=3)
    c.load_state_dict(state)
    assert c.next(4) + c.next(4) == first[4:]  # resumed exactly where it stopped
    with pytest.raises(ValueError, match="resume with the same data and data.seed"):
        PromptSampler(11, seed=3).load_state_dict(state)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 1000), sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_sampler_property_every_epoch_is_a_permutation(n, seed, sizes):
    s = PromptSampler(n, seed)
    drawn = [i for k in sizes for i in s.next(k)]
    for start in range(0, len(drawn) - n + 1, n):
        assert sorted(drawn[start:start + n]) == list(range(n))
    assert all(0 <= i < n for i in drawn)


def _bytes_jsonl(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = b'{"prompt": "1+1=", "answer": "2"}'


@pytest.mark.parametrize("bad", [
    b'{"prompt": "caf\xe9 1+1=", "answer": "2"}',  # Latin-1 / cp1252 text
    b'{"prompt": "1+1=", "answer": "\xff\xfe"}',  # stray bytes
    b'{"prompt": "1+1=", "answer": "\xe2\x82"}',  # a multi-byte character cut short
], ids=["latin1", "stray-bytes", "cut-character"])
def test_invalid_utf8_names_file_line_and_the_fix(tmp_path, tokenizer, bad):
    """Used to be a bare UnicodeDecodeError (`... in position 775`) with no file or line."""
    f = _bytes_jsonl(tmp_path / "p.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError) as err:
        load_prompts(f, tokenizer)
    message = str(err.value)
    assert "p.jsonl:3: not valid UTF-8" in message and "re-encode the file as UTF-8" in message, message


def test_a_lone_surrogate_escape_names_file_line_and_field(tmp_path, tokenizer):
    r"""`\ud83d` (half of an emoji, e.g. from text cut mid-character) is valid JSON but no character: the
    tokenizer failed with a bare TypeError."""
    f = _bytes_jsonl(tmp_path / "p.jsonl", [GOOD, b'{"prompt": "1+1=\\ud83d", "answer": "2"}'])
    with pytest.raises(ValueError, match=r"p.jsonl:2: field 'prompt' holds a lone surrogate \\ud83d"):
        load_prompts(f, tokenizer)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path, tokenizer):
    """Files saved by some Windows editors start with EF BB BF; it was "malformed JSON" on line 1."""
    f = _bytes_jsonl(tmp_path / "p.jsonl", [b"\xef\xbb\xbf" + GOOD, GOOD])
    assert [p.text for p in load_prompts(f, tokenizer)] == ["1+1=", "1+1="]


def test_invalid_utf8_in_a_parquet_string_column_names_file_row_and_column(tmp_path, tokenizer):
    """Parquet writers outside pyarrow may store non-UTF-8 bytes in a string column: to_pylist raised a bare
    UnicodeDecodeError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = pa.array([b"1+1=", b"2+2=", b"caf\xe9"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": prompts, "answer": ["2", "4", "x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError) as err:
        load_prompts(tmp_path / "p.parquet", tokenizer)
    message = str(err.value)
    assert "p.parquet:3: column 'prompt' is not valid UTF-8" in message and "re-encode" in message, message


def test_eval_path_errors_name_the_eval_file(tmp_path, tokenizer):
    """data.eval_path goes through the same reader: its encoding errors name it, not data.path."""
    from gift_megatron.config import DataConfig
    from gift_megatron.rollout.tasks import _file_task

    train = _bytes_jsonl(tmp_path / "train.jsonl", [GOOD] * 3)
    held_out = _bytes_jsonl(tmp_path / "eval.jsonl", [GOOD, b'{"prompt": "\xe9", "answer": "1"}'])
    data = DataConfig(name="jsonl", path=str(train), eval_path=str(held_out), tokenizer="unused")
    with pytest.raises(ValueError, match="eval.jsonl:2: not valid UTF-8"):
        _file_task(data, tokenizer)
