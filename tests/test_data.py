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
