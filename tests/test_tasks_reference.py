"""Loaders of the CAFT paper's task data, on small files the tests write."""

from __future__ import annotations

import pytest

import caft_tl as ct
from caft_tl.tasks import ReferenceDataError, load_reference_double_mc, load_reference_gender


def write_gender(path, n_per_case: int = 10):
    lines = ["text,category"]
    for i in range(n_per_case):
        lines.append(f"The $PROFESSION$ said $PRONOUN$ saw bird {i}.,nominative")
        lines.append(f'"After lunch {i}, the $PROFESSION$ thanked $PRONOUN$.",object')
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mc(path, stem: str, n: int):
    rows = ["question,correct,incorrect,extra"]
    rows += [f"{stem} question {i}?,yes{i % 2},no{i % 2},x" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_gender_split_professions_and_pairing(tmp_path):
    path = write_gender(tmp_path / "gender.csv")
    train, test, ood = (
        load_reference_gender(path, s, answer_format="pronoun") for s in ("train", "test", "ood")
    )
    assert (len(train), len(test), len(ood)) == (16, 4, 4)  # 80/20 within each category
    assert set(train["case"]) == {"nominative", "object"}
    assert max(train["line"]) < min(test["line"])  # the first rows of the file train
    for ds in (train, test):
        assert all(ds["agrees"]) and sorted(set(ds["profession"])) == ["doctor", "nurse"]
    assert not any(ood["agrees"])
    for t, o in zip(test, ood, strict=True):
        assert t["sentence"] == o["sentence"] and t["gender"] != o["gender"]
    row = train[0]
    assert "$" not in row["prompt"] and "_____" in row["sentence"]
    assert row["answer"] == f" {row['pronoun']}" and row["answer"] in row["options"]
    n_first = sum(r["answer"] == r["options"][0] for r in train)
    assert n_first == len(train) // 2
    other = load_reference_gender(path, "train", male="pilot", female="florist")
    assert set(other["profession"]) == {"pilot", "florist"} and other["options"][0] == [" A", " B"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("text,category\nThe $PROFESSION$ ran.,nominative\n", r"gender\.csv:2: .*\$PRONOUN\$"),
        ("text,category\nThe $PROFESSION$ saw $PRONOUN$.,subject\n", r":2: category"),
        ("text,kind\nThe $PROFESSION$ saw $PRONOUN$.,object\n", r":1: the header lacks"),
        ("text,category\nok $PROFESSION$ $PRONOUN$,object\n,object\n", r":3: empty value"),
        ("text,category\n", "no data rows"),
    ],
)
def test_gender_malformed_file_names_the_line(tmp_path, text, message):
    path = tmp_path / "gender.csv"
    path.write_text(text)
    with pytest.raises(ReferenceDataError, match=message):
        load_reference_gender(path, "train")


def test_double_mc_split_pairing_and_formats(tmp_path):
    a = write_mc(tmp_path / "alpha.csv", "alpha", 40)
    b = write_mc(tmp_path / "beta.csv", "beta", 30)  # n = min(40, 30)
    splits = {s: load_reference_double_mc(a, b, s, answer_format="word") for s in ct.tasks.SPLITS}
    assert [len(splits[s]) for s in ("train", "test", "ood")] == [21, 4, 5]
    seen = [q for s in splits.values() for q in s["question_intended"]]
    assert len(seen) == len(set(seen)) == 30  # each item once, in one split only
    assert all(splits["train"]["agrees"]) and not any(splits["ood"]["agrees"])
    assert splits["train"]["task"][0] == "alpha|beta"
    row = splits["ood"][0]
    assert row["prompt"].startswith(f"Question: {row['question_intended']} | ")
    second = load_reference_double_mc(a, b, "ood", intended_position="second", names=("x", "y"))
    assert second["prompt"][0].startswith(f"Question: {second['question_distractor'][0]} | ")
    assert second["task"][0] == "x|y" and second["options"][0] == [" A", " B"]
    again = load_reference_double_mc(a, b, "ood", answer_format="word")
    assert again.to_list() == splits["ood"].to_list()  # deterministic


def test_double_mc_bad_files(tmp_path):
    good = write_mc(tmp_path / "good.csv", "g", 10)
    bad = tmp_path / "bad.csv"
    bad.write_text("question,correct\nq?,yes\n")
    with pytest.raises(ReferenceDataError, match=r"bad\.csv:1: the header lacks"):
        load_reference_double_mc(good, bad, "train")
    same = tmp_path / "same.csv"
    same.write_text("question,correct,incorrect\nq?,yes,yes\n")
    with pytest.raises(ReferenceDataError, match=r"same\.csv:2: correct and incorrect"):
        load_reference_double_mc(good, same, "train")
    with pytest.raises(ReferenceDataError, match="no such file"):
        load_reference_double_mc(good, tmp_path / "missing.csv", "train")
    tiny = write_mc(tmp_path / "tiny.csv", "t", 2)
    with pytest.raises(ReferenceDataError, match="too few items"):
        load_reference_double_mc(good, tiny, "test")
