"""Reward parsing and verification on hand-written GSM8K-style and boxed answers, and a reward model."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gift_megatron.rollout.rewards import MathVerifier, extract_answer, last_boxed


@pytest.mark.parametrize("text,answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so the total is 1,234 dollars\n#### 1,234", "1234"),
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{3} then corrected: \\boxed{5}", None),  # two different final answers: a hedge
    ("\\boxed{5} so\n#### 5", "5"),  # stated twice, the same
    ("#### 18 dollars", "18"),  # the number after ####, not the line
    ("#### $1,234.50 in total", "1234.50"),
    ("nested \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
    ("We get 12 apples and then 15 pears.", "15"),
    ("I do not know.", None),
    ("broken \\boxed{12", "12"),  # unbalanced box: falls back to the last number
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_last_boxed_malformed_is_none():
    assert last_boxed("\\boxed{1 + {2}") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize("completion,reference,reward", [
    ("... so she has 72 clips.\n#### 72", "Natalia ... #### 72", 1.0),
    ("The result is \\boxed{72}", "#### 72", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),  # equal as numbers
    ("\\boxed{\\frac{2}{4}}", "0.5", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("#### 71", "#### 72", 0.0),  # wrong
    ("I give up", "#### 72", 0.0),  # no answer
    ("\\boxed{", "#### 72", 0.0),  # malformed
    ("\\boxed{\\frac{1}{}}", "#### 72", 0.0),  # unparsable
])
def test_math_verifier(completion, reference, reward):
    assert MathVerifier().score(completion, reference) == reward


def test_math_verifier_off_the_main_thread():
    """signal-based timeouts only work in the main thread: off it they are disabled, results unchanged."""
    out = {}

    def run():
        out["scores"] = MathVerifier().score_batch(["#### 72", "#### 7", "\\boxed{1/2}"], ["72", "72", "0.5"])

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert out["scores"].tolist() == [1.0, 0.0, 1.0]


def test_reward_model_scores_in_batches(tmp_path):
    """A tiny random sequence classifier built here: batched scores equal one-at-a-time scores."""
    import transformers

    from gift_megatron.rollout.rewards import RewardModel

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=300, num_labels=1, pad_token_id=0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    from tests.tokenizers import save_char_tokenizer

    save_char_tokenizer(tmp_path / "rm")
    rm = RewardModel(str(tmp_path / "rm"), batch_size=2)
    texts = ["12+7=19", "a much longer text 3+4=8", "x", "5+5=10"]
    batched = rm.score_batch(texts)
    single = torch.cat([rm.score_batch([t]) for t in texts])
    assert batched.shape == (4,) and batched.std() > 0
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def _completion(ids):
    from gift_megatron.rollout.engine import Completion

    return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop")


def test_rewards_compose_by_config_and_score_in_prompt_order():
    """1.0 x math_verify + 0.5 x exact, hand-computed per completion; groups arriving out of order
    (as servers finish them) come back in prompt order."""
    from gift_megatron.config import RewardConfig, RewardTermConfig
    from gift_megatron.rollout.rewards import GroupScorer, build_reward
    from gift_megatron.rollout.tasks import Sample

    EOS = 9
    digits = {1: "1", 2: "2", 3: "3", 4: "4"}
    decode = lambda ids: "".join(digits.get(i, "") for i in ids)  # noqa: E731
    cfg = RewardConfig(terms=[RewardTermConfig(kind="math_verify", weight=1.0),
                              RewardTermConfig(kind="exact", weight=0.5)])
    reward = build_reward(cfg, task="jsonl", eos_id=EOS, decode=decode)
    samples = [Sample([5], [1, 2], "12", "q0"), Sample([6], [3], "3", "q1")]
    groups = {0: [_completion([1, 2, EOS]), _completion([1, 2]), _completion([2, 1, EOS])],
              1: [_completion([3, EOS]), _completion([4, EOS]), _completion([])]}
    scorer = GroupScorer(reward, num_workers=2)
    ordered, totals, parts = scorer.score_all([(1, groups[1]), (0, groups[0])], samples)
    scorer.close()
    assert ordered == [groups[0], groups[1]]
    # "12"+EOS: both; "12" without EOS: math only; "21": neither | "3"+EOS: both; "4": neither; "": neither
    assert parts["math_verify"].tolist() == [1, 1, 0, 1, 0, 0]
    assert parts["exact"].tolist() == [1, 0, 0, 1, 0, 0]
    assert totals.tolist() == [1.5, 1.0, 0.0, 1.5, 0.0, 0.0]
    assert reward.accuracy(groups[0], samples[0]).tolist() == [1, 1, 0]  # files: the math check


def test_default_reward_is_the_tasks_check_and_missing_groups_are_named():
    from gift_megatron.config import RewardConfig
    from gift_megatron.rollout.rewards import GroupScorer, build_reward
    from gift_megatron.rollout.tasks import Sample

    reward = build_reward(RewardConfig(), task="addition", eos_id=9, decode=str)
    assert [k for k, _, _ in reward.terms] == ["exact"]
    scorer = GroupScorer(reward, num_workers=1)
    with pytest.raises(RuntimeError, match=r"returned groups \[0\] for 2 prompts"):
        scorer.score_all([(0, [_completion([9])])], [Sample([1], [], "", ""), Sample([1], [], "", "")])
    scorer.close()


def test_a_reward_model_that_returns_nan_is_named(tmp_path):
    """A broken reward model (a NaN in its score head) must stop scoring with the term named, before a
    NaN reward reaches the advantages."""
    import transformers

    from gift_megatron.config import RewardConfig, RewardTermConfig
    from gift_megatron.rollout.rewards import GroupScorer, build_reward
    from gift_megatron.rollout.tasks import Sample
    from tests.tokenizers import save_char_tokenizer

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=300, num_labels=1, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "rm")
    save_char_tokenizer(tmp_path / "rm")
    cfg = RewardConfig(terms=[RewardTermConfig(kind="exact"),
                              RewardTermConfig(kind="reward_model", path=str(tmp_path / "rm"), weight=0.1)])
    scorer = GroupScorer(build_reward(cfg, task="jsonl", eos_id=9, decode=str), num_workers=1)
    with pytest.raises(ValueError, match="reward term 'reward_model' returned .*nan.* must be finite"):
        scorer.score_all([(0, [_completion([1, 9])])], [Sample([5], [1], "1", "1+0=")])
    scorer.close()


_PROSE = st.text(alphabet=st.characters(blacklist_characters="#\\", blacklist_categories=("Cs", "Nd")), max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_property_parsers_never_raise_on_any_text(text):
    """Model output is arbitrary text: the parsers return a string or None, never raise."""
    for out in (extract_answer(text), extract_answer(text, last_number=False), last_boxed(text)):
        assert out is None or isinstance(out, str)


@settings(max_examples=200, deadline=None)
@given(_PROSE, st.integers(-10**9, 10**9), _PROSE)
def test_property_the_final_answer_is_found_in_any_wrapping(before, n, after):
    """'#### N' and \\boxed{N} are stated answers (all must agree), else the last number counts."""
    assert extract_answer(f"{before}\\boxed{{{n}}}{after}\n#### {n}\n") == str(n)
    assert extract_answer(f"{before}\\boxed{{{n + 1}}}{after}\n#### {n}\n") is None
    assert extract_answer(f"{before} 7 {after}\\boxed{{{n}}}{after}") == str(n)
    assert extract_answer(f"{before}{after} {n}{after}") == str(n)
    assert extract_answer(f"{before}{after}", last_number=False) is None


@settings(max_examples=50, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_property_math_verifier_is_exactly_equality_on_integers(a, b):
    verifier = MathVerifier()
    assert verifier.score(f"so the answer is {a}", f"#### {b}") == float(a == b)


_UNITS = st.sampled_from(["", " dollars", " apples", "$", " cm.", " per day", " (final)", "."])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), _UNITS, _PROSE)
def test_property_gsm8k_answer_with_units_scores_by_its_number(n, unit, prose):
    """'#### 18 dollars' is the answer 18 (the whole line used to be taken and scored 0)."""
    verifier = MathVerifier()
    assert verifier.score(f"{prose}\n#### {n}{unit}", f"#### {n}") == 1.0
    assert verifier.score(f"{prose}\n#### {n + 1}{unit}", f"#### {n}") == 0.0


@settings(max_examples=100, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6), _PROSE, st.booleans())
def test_property_hedging_over_several_answers_scores_zero(a, b, prose, gold_first):
    """Several distinct final answers score 0 whichever is right and wherever it stands (the last box
    used to win, so hedging paid); the same answer stated twice still scores."""
    verifier = MathVerifier()
    first, second = (a, b) if gold_first else (b, a)
    hedge = f"\\boxed{{{first}}}{prose} or \\boxed{{{second}}}"
    assert verifier.score(hedge, f"#### {a}") == float(a == b)
    assert verifier.score(f"\\boxed{{{first}}}{prose}\n#### {second}", f"#### {a}") == float(a == b)
    assert verifier.score(f"\\boxed{{{a}}}{prose}\n#### {a}", f"#### {a}") == 1.0


@pytest.mark.parametrize("completion,reward", [
    ("#### 18", 1.0), ("#### 18 dollars", 1.0), ("#### $18", 1.0), ("#### $18.00", 1.0), ("####18", 1.0),
    ("The answer is \\boxed{18}.", 1.0), ("$\\boxed{\\$18}$", 1.0), ("She makes 9 * 2 = $18 every day.", 1.0),
    ("\\boxed{18}\n#### 18", 1.0), ("#### 18\n#### 18", 1.0),
    ("#### 17", 0.0), ("#### 18 or 17", 0.0), ("\\boxed{17} or \\boxed{18}", 0.0), ("\\boxed{18} or \\boxed{17}", 0.0),
    ("\\boxed{17}\n#### 18", 0.0), ("#### 18\n#### 17", 0.0), ("#### eighteen", 0.0), ("", 0.0),
    ("18 or 17", 0.0), ("\\boxed{}", 0.0), ("#### ", 0.0), ("#### -18", 0.0),
])
def test_gsm8k_answer_formats(completion, reward):
    """22 ways a model writes (or hedges) the answer to GSM8K's first test problem (gold: 18)."""
    assert MathVerifier().score(completion, "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n#### 18") == reward
