"""Reward functions and their weighted combination."""

import math

import pytest

from lit_tune.rl.rewards import (
    RewardSet,
    extract_final_number,
    final_answer_format,
    numeric_match,
    resolve_reward,
    reward_path,
    starts_with_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
        ("so the total is $1,200.\n#### 1,200 dollars", 1200.0),
        ("#### -5", -5.0),
        ("#### 3.50", 3.5),
        ("She has 3 apples and buys 4 more, so 7 in all.", 7.0),
        ("The answer is 1,234,567.", 1234567.0),
        ("72", 72.0),
        ("first 10 then #### 12 and later 99", 12.0),
        ("1,2", 2.0),  # a comma not followed by three digits separates two numbers
        ("no digits here", None),
        ("#### none", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_numeric_match_gsm8k_reference():
    reference = "Betty needs 100 - 50 - 30 - 15 = <<100-50-30-15=5>>5 more.\n#### 5"
    completions = ["She needs 5 more.\n#### 5", "#### 5.0", "It is 5 dollars", "#### 6", "", "#### 55"]
    rewards = numeric_match(["q"] * 6, completions, answer=[reference] * 6)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_numeric_match_commas_and_bare_answers():
    rewards = numeric_match(["q", "q", "q"], ["#### 1,000", "about 1000 in total", "#### 1,001"], answer=["1000", 1000, "#### 1,000"])
    assert rewards == [1.0, 1.0, 0.0]


def test_numeric_match_reference_without_number():
    with pytest.raises(ValueError, match="contains no number"):
        numeric_match(["q"], ["#### 1"], answer=["unknown"])


def test_final_answer_format():
    completions = ["3 + 4 = 7\n#### 7", "#### 1,234.  ", "#### $12.", "the answer is 7", "#### 7 apples", "#### x"]
    assert final_answer_format(["q"] * 6, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_starts_with_number():
    assert starts_with_number(["q"] * 4, [" 7", "-3 apples", "seven", ""]) == [1.0, 1.0, 0.0, 0.0]


def length_penalty(prompts, completions, **fields):
    return [-0.1 * len(c) for c in completions]


def answer_seen(prompts, completions, answer, source, **fields):
    # Checks that every column arrives with one value per completion.
    return [float(a in c) + 0.0 * len(s) for c, a, s in zip(completions, answer, source)]


def test_reward_set_weights_and_components():
    rewards = RewardSet([numeric_match, length_penalty], weights=[1.0, 2.0])
    fields = [{"answer": "7", "source": "x"}, {"answer": "7", "source": "x"}]
    scores = rewards(["Say 7.", "Say 7."], ["7", "#### 8"], fields)
    assert scores.components == {"numeric_match": [1.0, 0.0], "length_penalty": [pytest.approx(-0.1), pytest.approx(-0.6)]}
    assert scores.total[0] == pytest.approx(1.0 + 2.0 * -0.1, abs=1e-12)
    assert scores.total[1] == pytest.approx(0.0 + 2.0 * -0.6, abs=1e-12)


def test_reward_set_passes_row_fields():
    rewards = RewardSet([answer_seen])
    fields = [{"answer": "3", "source": "a"}, {"answer": "4", "source": "b"}]
    assert rewards(["p", "p"], ["3", "3"], fields).total == [1.0, 0.0]


def test_reward_set_rejects_bad_outputs():
    def too_few(prompts, completions, **fields):
        return [1.0]

    def not_finite(prompts, completions, **fields):
        return [math.nan] * len(completions)

    with pytest.raises(ValueError, match="'too_few' returned 1 values for 2 completions"):
        RewardSet([too_few])(["p", "p"], ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="'not_finite' returned non-finite"):
        RewardSet([not_finite])(["p"], ["a"], [{}])


def test_reward_set_rejects_bad_settings():
    with pytest.raises(ValueError, match="rewards is empty"):
        RewardSet([])
    with pytest.raises(ValueError, match="2 reward weights for 1 rewards"):
        RewardSet(["numeric_match"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="must be unique"):
        RewardSet(["numeric_match", numeric_match])


def test_reward_path_round_trip():
    assert resolve_reward(reward_path(numeric_match)) is numeric_match
    assert reward_path(numeric_match) == "numeric_match"
    assert reward_path(length_penalty).endswith("test_rewards.length_penalty")
    assert resolve_reward(reward_path(length_penalty)) is length_penalty


def test_resolve_reward_names_and_paths():
    assert resolve_reward("final_answer_format") is final_answer_format
    assert resolve_reward("lit_tune.rl.rewards.numeric_match") is numeric_match
    with pytest.raises(ValueError, match="Unknown reward 'exact'"):
        resolve_reward("exact")
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward("no_such_package.reward")
