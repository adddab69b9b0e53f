"""Generated data sets that need no download: small arithmetic tasks for smoke runs and tests."""

from __future__ import annotations

import random

BUILTIN_PREFIX = "builtin:"
_NAMES = ("arithmetic", "preferences", "copy_number", "fixed_answer")


def arithmetic_rows(num_rows: int = 2000, seed: int = 0) -> list[dict[str, str]]:
    """Generate addition questions with GSM8K-style answers (``... #### <number>``).

    Args:
        num_rows: How many rows to generate.
        seed: Seed of the generator; the same seed gives the same rows.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def preference_rows(num_rows: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """Generate preference pairs: the chosen response has the right sum, the rejected a wrong one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"{a} + {b} = {a + b}\n#### {a + b}",
                "rejected": f"{a} + {b} = {wrong}\n#### {wrong}",
            }
        )
    return rows


def copy_number_rows(num_rows: int = 512, seed: int = 0) -> list[dict[str, str]]:
    """Generate prompts asking to repeat a number; the reference answer is that number."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        n = rng.randint(0, 9)
        rows.append({"prompt": f"Repeat the number {n}.", "answer": str(n)})
    return rows


def fixed_answer_rows(num_rows: int = 256, answer: int = 7, seed: int = 0) -> list[dict[str, str]]:
    """Generate prompts that all ask for the same number; the reference answer is that number.

    A task with a verifiable reward that a randomly initialised model learns by RL alone within a
    few minutes on a CPU. The reference number never changes, so the policy only has to sample it
    once and then reinforce it. The prompts vary in wording.

    Args:
        num_rows: How many rows to generate.
        answer: The number every prompt asks for.
        seed: Seed of the generator; the same seed gives the same rows.
    """
    templates = (
        "Reply with the number {n}.",
        "Answer with {n} and nothing else.",
        "Say {n}.",
        "What number comes after {p}?",
        "Write the digit {n}.",
    )
    rng = random.Random(seed)
    return [
        {"prompt": rng.choice(templates).format(n=answer, p=answer - 1), "answer": str(answer)}
        for _ in range(num_rows)
    ]


def builtin_rows(source: str) -> list[dict[str, str]]:
    """Return the rows of ``"builtin:<name>"``.

    Raises:
        ValueError: If the name is unknown.
    """
    name = source.removeprefix(BUILTIN_PREFIX)
    if name == "arithmetic":
        return arithmetic_rows()
    if name == "preferences":
        return preference_rows()
    if name == "copy_number":
        return copy_number_rows()
    if name == "fixed_answer":
        return fixed_answer_rows()
    raise ValueError(f"Unknown built-in data set {source!r}. Choose one of {[BUILTIN_PREFIX + n for n in _NAMES]}.")


__all__ = [
    "BUILTIN_PREFIX",
    "arithmetic_rows",
    "builtin_rows",
    "copy_number_rows",
    "fixed_answer_rows",
    "preference_rows",
]
