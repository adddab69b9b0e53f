"""Reward functions for verifiable tasks, and :class:`RewardSet`, which combines them with weights.

A reward function is a plain callable::

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]: ...

``prompts[i]`` and ``completions[i]`` belong to the same sample (a prompt appears once per
completion of its group), and every other column of the data row arrives as a keyword argument
holding one value per completion, for example ``answer=["72", "72", ...]``. Functions that do not
use a column should accept ``**fields`` so that they work with any data set.

Under asynchronous rollouts the functions run in the generation worker, a spawned process, so
they must be picklable: define them at module level (no lambdas or closures).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RewardFunction = Callable[..., Sequence[float]]

FINAL_ANSWER_MARKER = "####"
# A number with optional sign, thousands separators ("1,234") and decimals. A comma that does not
# separate groups of three digits ends the number, so "1,2" reads as 1 and 2.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_FINAL_LINE = re.compile(r"####\s*\$?\s*(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)\s*\.?\s*$")


def extract_final_number(text: str) -> float | None:
    """Extract the final numeric answer of a GSM8K-style text.

    When the text contains ``####``, the answer is the first number after the last ``####``;
    otherwise it is the last number in the text. Thousands separators, currency signs and
    surrounding words are ignored: ``"so she pays $1,200 in total.\\n#### 1,200 dollars"`` gives
    ``1200.0``.

    Args:
        text: A reference answer or a generated completion.

    Returns:
        The number, or None when there is none.
    """
    marker = text.rfind(FINAL_ANSWER_MARKER)
    if marker >= 0:
        match = _NUMBER.search(text, marker + len(FINAL_ANSWER_MARKER))
        return _to_float(match.group()) if match else None
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def numeric_match(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any], **fields: Any) -> list[float]:
    """Reward 1.0 when the completion's final number equals the reference answer's, else 0.0.

    Both sides go through :func:`extract_final_number`, so a reference in GSM8K format
    (``"...#### 72"``) and a bare reference (``"72"`` or ``72``) both work. Numbers are equal
    within an absolute tolerance of 1e-6.

    Args:
        prompts: One prompt per completion (unused).
        completions: Generated texts, without special tokens.
        answer: Reference answer of each completion's row (the ``answer`` column).
        **fields: Other columns of the rows (unused).

    Returns:
        One reward per completion.

    Raises:
        ValueError: If a reference answer contains no number.
    """
    rewards = []
    for completion, reference in zip(completions, answer, strict=True):
        expected = extract_final_number(str(reference))
        if expected is None:
            raise ValueError(
                f"numeric_match: the reference answer {str(reference)!r:.80} contains no number. "
                "Use a data set whose 'answer' column ends in a number, or another reward."
            )
        found = extract_final_number(completion)
        rewards.append(float(found is not None and math.isclose(found, expected, rel_tol=0.0, abs_tol=1e-6)))
    return rewards


def final_answer_format(prompts: Sequence[Any], completions: Sequence[str], **fields: Any) -> list[float]:
    """Reward 1.0 when the completion ends with a line ``#### <number>``, else 0.0.

    The usual companion of :func:`numeric_match` on GSM8K: it rewards the answer format whether
    or not the number is right. Trailing whitespace and a final full stop are allowed.

    Args:
        prompts: One prompt per completion (unused).
        completions: Generated texts, without special tokens.
        **fields: Columns of the rows (unused).

    Returns:
        One reward per completion.
    """
    return [float(_FINAL_LINE.search(completion) is not None) for completion in completions]


def starts_with_number(prompts: Sequence[Any], completions: Sequence[str], **fields: Any) -> list[float]:
    """Reward 1.0 when the completion's first non-blank character is a digit or a minus sign.

    A shaping reward for small models trained from scratch: it is easy to find by sampling and
    leads towards answers that :func:`numeric_match` can score.

    Args:
        prompts: One prompt per completion (unused).
        completions: Generated texts, without special tokens.
        **fields: Columns of the rows (unused).

    Returns:
        One reward per completion.
    """
    return [float(_NUMBER.match(completion.lstrip()) is not None) for completion in completions]


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "final_answer_format": final_answer_format,
    "numeric_match": numeric_match,
    "starts_with_number": starts_with_number,
}


def resolve_reward(reward: str | RewardFunction) -> RewardFunction:
    """Return the reward function that ``reward`` names.

    Args:
        reward: A callable, the name of a built-in reward (see ``BUILTIN_REWARDS``), or the
            import path of a function, such as ``"my_project.rewards.exact_match"``.

    Raises:
        ValueError: If the name is neither a built-in nor an importable callable.
    """
    if callable(reward):
        return reward
    if reward in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[reward]
    module_name, _, attribute = reward.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError) as error:
        raise ValueError(f"Reward {reward!r} could not be imported: {error}.") from error
    if not callable(function):
        raise ValueError(
            f"Unknown reward {reward!r}. Use one of the built-ins {sorted(BUILTIN_REWARDS)} or the "
            "import path of a function, such as 'my_project.rewards.exact_match'."
        )
    return function


def reward_path(function: RewardFunction) -> str:
    """Return the name :func:`resolve_reward` maps back to ``function``: a built-in name or an import path.

    Lambdas, closures and callable objects get a descriptive path that does not import.
    """
    for name, builtin in BUILTIN_REWARDS.items():
        if function is builtin:
            return name
    module = getattr(function, "__module__", None) or type(function).__module__
    qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{qualname}"


def reward_name(function: RewardFunction) -> str:
    """Return the name a reward function's metrics are logged under."""
    return getattr(function, "__name__", type(function).__name__)


@dataclass
class RewardScores:
    """Rewards of a set of completions.

    Attributes:
        total: Weighted sum of the components, one value per completion.
        components: Unweighted reward of each function, by function name.
    """

    total: list[float]
    components: dict[str, list[float]]


class RewardSet:
    """Several reward functions, combined as a weighted sum.

    Args:
        rewards: Reward functions, or names that :func:`resolve_reward` accepts.
        weights: One weight per reward; all 1.0 when None.

    Raises:
        ValueError: If there is no reward, the weights do not match the rewards, or two rewards
            have the same name.

    Example::

        rewards = RewardSet(["numeric_match", "final_answer_format"], weights=[1.0, 0.2])
        scores = rewards(prompts, completions, [{"answer": "72"}] * len(completions))
    """

    def __init__(self, rewards: Sequence[str | RewardFunction], weights: Sequence[float] | None = None) -> None:
        if not rewards:
            raise ValueError("rewards is empty; give at least one reward function, e.g. ['numeric_match'].")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(
                f"Got {len(weights)} reward weights for {len(rewards)} rewards; give one weight per reward."
            )
        self.functions = [resolve_reward(reward) for reward in rewards]
        self.weights = weights
        self.names = [reward_name(function) for function in self.functions]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"Reward names must be unique because each is logged under its name, got {self.names}.")

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], fields: Sequence[Mapping[str, Any]]
    ) -> RewardScores:
        """Score completions with every reward function.

        Args:
            prompts: One prompt per completion.
            completions: Generated texts.
            fields: The data row of each completion; each column is passed to the reward
                functions as a keyword argument with one value per completion.

        Raises:
            ValueError: If a function returns the wrong number of rewards or a non-finite one.
        """
        columns = _columns(fields)
        components = {}
        for name, function in zip(self.names, self.functions):
            values = [float(v) for v in function(list(prompts), list(completions), **columns)]
            _check_rewards(name, values, len(completions))
            components[name] = values
        total = [
            sum(weight * components[name][i] for name, weight in zip(self.names, self.weights))
            for i in range(len(completions))
        ]
        return RewardScores(total=total, components=components)


def _columns(fields: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    names = sorted({name for row in fields for name in row})
    return {name: [row.get(name) for row in fields] for name in names}


def _check_rewards(name: str, values: list[float], expected: int) -> None:
    if len(values) != expected:
        raise ValueError(f"Reward {name!r} returned {len(values)} values for {expected} completions; return one per completion.")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"Reward {name!r} returned non-finite values {bad[:4]}; rewards must be finite numbers.")


__all__ = [
    "BUILTIN_REWARDS",
    "FINAL_ANSWER_MARKER",
    "RewardFunction",
    "RewardScores",
    "RewardSet",
    "extract_final_number",
    "final_answer_format",
    "numeric_match",
    "reward_name",
    "reward_path",
    "resolve_reward",
    "starts_with_number",
]
