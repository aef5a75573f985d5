"""Loaders for the CAFT paper's own task data, for users who have a copy of it.

The paper's gender and double multiple-choice data are not shipped here (they are another
project's data); these functions read them from a path and build the same columns as the
built-in tasks, so they run through the same fine-tuning, direction finding and evaluation.

- :func:`load_reference_gender`: the gender CSV (columns ``text`` with ``$PROFESSION$`` and
  ``$PRONOUN$``, ``category`` ``nominative`` / ``object``). Within each category the first
  80% of rows (file order) are "train" and the rest are held out; "test" and "ood" are the
  same held-out sentences. After a seeded shuffle, the first half of each category's rows
  takes the male-stereotyped profession and the second half the female one; the pronoun's
  gender agrees with it in "train" and "test" and disagrees in "ood".
- :func:`load_reference_double_mc`: two sub-task CSVs (columns ``question``, ``correct``,
  ``incorrect``; others ignored). After removing repeated questions, ``n = min(len_a, len_b,
  n_max)`` items of each are permuted (seeded) and paired by index; the first 70% of pairs
  are "train", the next 15% "test" (both answers in one option) and the last 15% "ood" (the
  intended and the distractor answer in different options).

Malformed files raise :class:`ReferenceDataError` naming the file and line.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from caft_tl.tasks._mc import check_split, to_dataset
from caft_tl.tasks.double_mc import Item, double_mc_row
from caft_tl.tasks.gender import BLANK, pronoun_row

__all__ = ["ReferenceDataError", "load_reference_double_mc", "load_reference_gender"]

GENDER_COLUMNS = ("text", "category")
MC_COLUMNS = ("question", "correct", "incorrect")
CATEGORIES = ("nominative", "object")


class ReferenceDataError(ValueError):
    """A reference data file is missing, empty or malformed (the message names the line)."""


def _read_csv(path: str | os.PathLike, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every data row; every ``columns`` entry non-empty."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceDataError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ReferenceDataError(
                f"{path}:1: the header lacks column(s) {missing} (found {reader.fieldnames})"
            )
        rows = []
        for row in reader:
            line = reader.line_num
            empty = [c for c in columns if not (row.get(c) or "").strip()]
            if empty:
                raise ReferenceDataError(f"{path}:{line}: empty value in column(s) {empty}")
            rows.append((line, {c: row[c].strip() for c in columns}))
    if not rows:
        raise ReferenceDataError(f"{path}: no data rows")
    return rows


def _gender_rows(path: str | os.PathLike) -> dict[str, list[tuple[int, str]]]:
    """``{category: [(line, text), ...]}`` in file order, repeated texts dropped."""
    by_case: dict[str, list[tuple[int, str]]] = {c: [] for c in CATEGORIES}
    seen: set[str] = set()
    for line, row in _read_csv(path, GENDER_COLUMNS):
        text, case = row["text"], row["category"]
        if case not in CATEGORIES:
            raise ReferenceDataError(
                f"{path}:{line}: category must be one of {CATEGORIES}, got {case!r}"
            )
        for marker in ("$PROFESSION$", "$PRONOUN$"):
            if text.count(marker) != 1:
                raise ReferenceDataError(
                    f"{path}:{line}: text must hold {marker} exactly once: {text!r}"
                )
        if text not in seen:
            seen.add(text)
            by_case[case].append((line, text))
    return by_case


def load_reference_gender(
    path: str | os.PathLike,
    split: str,
    *,
    male: str = "doctor",
    female: str = "nurse",
    answer_format: str = "letter",
    train_fraction: float = 0.8,
    seed: int = 42,
) -> Dataset:
    """The paper's gender task from its CSV at ``path`` (see the module docstring).

    With the paper's 784-row file: 626 "train" rows and 158 "test" / "ood" rows. ``male`` and
    ``female`` are the two professions (the paper's doctor and nurse). Rows have the columns
    of :func:`caft_tl.tasks.gender_pronoun` plus ``line`` (the CSV line). The correct option
    comes first in half the rows of each category and profession.
    """
    check_split(split)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not (male and female) or male == female:
        raise ValueError(
            f"male and female must be two different professions, got {male!r}, {female!r}"
        )
    rows: list[dict[str, Any]] = []
    for case, texts in _gender_rows(path).items():
        cut = int(train_fraction * len(texts))
        part = texts[:cut] if split == "train" else texts[cut:]
        order = list(range(len(part)))
        random.Random(f"{seed}|{case}").shuffle(order)
        half = len(order) // 2
        for stereotype, members in (("male", order[:half]), ("female", order[half:])):
            flags = [i % 2 == 0 for i in range(len(members))]
            random.Random(f"{seed}|{case}|{stereotype}").shuffle(flags)
            profession = male if stereotype == "male" else female
            for index, correct_first in zip(sorted(members), flags, strict=True):
                line, text = part[index]
                sentence = text.replace("$PROFESSION$", profession).replace("$PRONOUN$", BLANK)
                row = pronoun_row(split, sentence, case, stereotype, correct_first, answer_format)
                rows.append(
                    {**row, "task": "reference_gender", "profession": profession, "line": line}
                )
    if not rows:
        raise ReferenceDataError(f"{path}: no rows for split {split!r}")
    return to_dataset(sorted(rows, key=lambda r: r["line"]))


def _mc_items(path: str | os.PathLike) -> list[tuple[int, Item]]:
    items, seen = [], set()
    for line, row in _read_csv(path, MC_COLUMNS):
        if row["correct"] == row["incorrect"]:
            raise ReferenceDataError(f"{path}:{line}: correct and incorrect are the same")
        if row["question"] not in seen:
            seen.add(row["question"])
            items.append((line, Item(row["question"], row["correct"], row["incorrect"])))
    return items


def load_reference_double_mc(
    intended: str | os.PathLike,
    distractor: str | os.PathLike,
    split: str,
    *,
    names: tuple[str, str] | None = None,
    answer_format: str = "letter",
    intended_position: str = "first",
    n_max: int = 2000,
    seed: int = 42,
) -> Dataset:
    """Double multiple choice from the paper's sub-task CSVs (see the module docstring).

    ``intended`` and ``distractor`` are CSV paths; ``names`` names the two sub-tasks (default:
    the file names without ``.csv``). Rows have the columns of
    :func:`caft_tl.tasks.double_mc`; the correct option comes first in half of each split's
    rows. ``intended_position="second"`` shows the intended question second, as the paper's
    runs whose intended question is the second one.
    """
    check_split(split)
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    name_i, name_d = names or (Path(intended).stem, Path(distractor).stem)
    items_i, items_d = _mc_items(intended), _mc_items(distractor)
    n = min(len(items_i), len(items_d), n_max)
    # Each file permuted on its own (seeded), then paired by index.
    perm_i = np.random.RandomState(seed).permutation(len(items_i))[:n]
    perm_d = np.random.RandomState(seed + 1).permutation(len(items_d))[:n]
    n_train, n_test = int(0.7 * n), int(0.15 * n)
    bounds = {
        "train": (0, n_train),
        "test": (n_train, n_train + n_test),
        "ood": (n_train + n_test, n),
    }
    start, stop = bounds[split]
    if start >= stop:
        raise ReferenceDataError(f"too few items ({n} pairs) for a {split!r} split")
    flags = [i % 2 == 0 for i in range(stop - start)]
    random.Random(f"{seed}|{split}").shuffle(flags)
    rows = []
    for k, correct_first in zip(range(start, stop), flags, strict=True):
        (_, item_i), (_, item_d) = items_i[perm_i[k]], items_d[perm_d[k]]
        rows.append(
            double_mc_row(
                (name_i, item_i), (name_d, item_d), split, correct_first,
                answer_format=answer_format, intended_position=intended_position,
            )
        )  # fmt: skip
    return to_dataset(rows)
