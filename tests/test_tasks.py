"""The synthetic addition task and its exact-answer reward."""

import pytest

from gift_megatron.rollout.tasks import addition_problems, corpus, exact_answer_reward


def test_split_is_deterministic_disjoint_and_complete():
    train, held_out = addition_problems(seed=0, num_eval=500)
    assert len(train) == 8100 - 500 and len(held_out) == 500
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert addition_problems(seed=0, num_eval=500) == (train, held_out)
    assert addition_problems(seed=1, num_eval=500)[1] != held_out
    p = held_out[0]
    a, b = p.prompt[:-1].split("+")
    assert int(p.answer) == int(a) + int(b) and 10 <= int(a) <= 99
    assert corpus([p]) == [p.prompt + p.answer]


def test_bad_split_size_is_named():
    with pytest.raises(ValueError, match="data.num_eval_prompts=0"):
        addition_problems(seed=0, num_eval=0)


@pytest.mark.parametrize("completion,reward", [
    ([8, 5, 3], 1.0),  # "85" then EOS
    ([8, 5], 0.0),  # did not stop
    ([8, 5, 5, 3], 0.0),  # extra digit
    ([8, 3], 0.0),  # wrong
    ([3], 0.0),  # empty answer
])
def test_exact_answer_reward(completion, reward):
    assert exact_answer_reward(completion, answer_ids=[8, 5], eos_id=3) == reward
