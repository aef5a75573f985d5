"""Shared shape of the built-in multiple-choice tasks.

Every row of a multiple-choice ``datasets.Dataset`` has at least:

- ``prompt`` (str): the question, ending in ``"Answer:"``;
- ``answer`` (str): the correct option's token as it follows the prompt (``" A"``);
- ``options`` (list[str]): every option's token in letter order (``[" A", " B"]``);
- ``task`` (str) and ``split`` (str): used by :func:`caft_tl.evals.multiple_choice` to
  report accuracy per group.

``prompt`` + ``answer`` is what :func:`caft_tl.train.finetune` trains on (loss on the answer
token only); the other columns are metadata for evaluation and analysis.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset

SPLITS = ("train", "test", "ood")
LETTERS = ("A", "B")
OPTION_TOKENS = [f" {letter}" for letter in LETTERS]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_n(n: int | None, available: int, what: str) -> int:
    """``n`` examples (all ``available`` when None); a clear error when there are too few."""
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    if n > available:
        raise ValueError(f"n={n} but {what} has only {available} distinct examples")
    return n


def rng_for(*parts: Any) -> random.Random:
    """A private RNG seeded from ``parts`` (never the global one: tasks are pure functions)."""
    return random.Random("|".join(map(str, parts)))


def answer_token(index: int) -> str:
    return OPTION_TOKENS[index]


def to_dataset(rows: Sequence[dict[str, Any]]) -> Dataset:
    if not rows:
        raise ValueError("no examples")
    return Dataset.from_list(list(rows))
