"""Tests for caft_tl.tasks.double_mc: pools, the fixed partition, the double and single
multiple-choice datasets, and the contrast sets."""

from __future__ import annotations

import importlib
import re
from collections import Counter

import pytest

from caft_tl.tasks._mc import OPTION_TOKENS
from caft_tl.tasks.double_mc import (
    ANSWER_FORMATS,
    CONTINENTS,
    FEMALE_NAMES,
    MALE_NAMES,
    SINGULAR_VERBS,
    SUBTASKS,
    Item,
    contrast_set,
    double_mc,
    label,
    pairs,
    pool,
    single_mc,
)

# The module (the package re-exports the function under the same name).
dmc = importlib.import_module("caft_tl.tasks.double_mc")
MIN_POOL = {"sentiment": 240, "verbs": 240, "pronouns": 240, "continents": 120}
IRREGULAR = {"bus": False, "children": True}  # noun -> is plural
BALANCED = ("sentiment", "verbs", "pronouns")
SPLITS = ("train", "test", "ood")


def questions(subtask: str, part: str) -> set[str]:
    return {item.question for item in pool(subtask, part)}


def quoted(question: str) -> str:
    match = re.search(r'"(.*)"', question)
    assert match, question
    return match.group(1)


def option_answers(prompt: str) -> dict[str, tuple[str, str]]:
    """{" A": (intended answer, distractor answer), " B": (...)} parsed from a prompt."""
    lines = prompt.split("\n")
    out = {}
    for token, line in zip(OPTION_TOKENS, lines[1:3], strict=True):
        assert line.startswith(f"{token.strip()}. "), line
        intended, distractor = line[3:].split(", ")
        out[token] = (intended, distractor)
    return out


# ---------------------------------------------------------------------------- pools


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_pool_size_distinct_and_short_answers(subtask):
    items = pool(subtask)
    assert len(items) >= MIN_POOL[subtask]
    assert len({item.question for item in items}) == len(items)
    for item in items:
        assert isinstance(item, Item) and len(item) == 3
        assert item.correct != item.incorrect
        assert 1 <= len(item.correct.split()) <= 2 and 1 <= len(item.incorrect.split()) <= 2
        assert "|" not in item.question and "\n" not in item.question
        assert "," not in item.correct + item.incorrect


@pytest.mark.parametrize("subtask", BALANCED)
@pytest.mark.parametrize("part", ["all", "train", "heldout"])
def test_pool_labels_balanced(subtask, part):
    counts = Counter(label(subtask, item) for item in pool(subtask, part))
    assert len(counts) == 2
    assert len(set(counts.values())) == 1, counts


def test_sentiment_items():
    for item in pool("sentiment"):
        assert re.fullmatch(r'Is "[A-Z][^"]+[.]" positive or negative\?', item.question)
        assert {item.correct, item.incorrect} == {"positive", "negative"}


def test_verb_items_agree_and_use_attractors():
    items = pool("verbs")
    with_attractor = 0
    for item in items:
        sentence = quoted(item.question)
        assert re.fullmatch(r"The [a-z ]+ ___ [a-z ]+\.", sentence), sentence
        subject = sentence.split(" ___ ")[0].split()
        singular = item.correct in SINGULAR_VERBS
        assert (item.incorrect in SINGULAR_VERBS) != singular
        head = subject[1]
        assert IRREGULAR.get(head, head.endswith("s")) != singular, item
        if len(subject) > 2:
            with_attractor += 1
            attractor = subject[-1]
            assert attractor.endswith("s") == singular, item  # the other number
    assert 0.2 * len(items) <= with_attractor <= 0.5 * len(items)


def test_pronoun_items_match_name_gender():
    assert len(set(FEMALE_NAMES)) >= 40 and len(set(MALE_NAMES)) >= 40
    assert not set(FEMALE_NAMES) & set(MALE_NAMES)
    female, male = set(FEMALE_NAMES), set(MALE_NAMES)
    pronoun_pairs = {("her", "his"), ("she", "he"), ("herself", "himself")}
    for item in pool("pronouns"):
        sentence = quoted(item.question)
        assert sentence.count("___") == 1
        names = [word.strip(",.") for word in sentence.split() if word.strip(",.") in female | male]
        assert len(names) == 1, sentence
        if names[0] in female:
            assert (item.correct, item.incorrect) in pronoun_pairs
        else:
            assert (item.incorrect, item.correct) in pronoun_pairs


def test_continent_items():
    items = pool("continents")
    assert {item.correct for item in items} == set(CONTINENTS)
    for item in items:
        assert re.fullmatch(r"Which continent is .+ in\?", item.question)
        assert item.incorrect in CONTINENTS and item.incorrect != item.correct
    assert len(set(Counter(item.incorrect for item in items))) >= 5


def test_continent_place_repeats_stay_in_one_partition():
    def place(question: str) -> str:
        return re.sub(r"^Which continent is (the city of )?| in\?$", "", question)

    train = {place(q) for q in questions("continents", "train")}
    heldout = {place(q) for q in questions("continents", "heldout")}
    assert not train & heldout


# ---------------------------------------------------------------------------- partition


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_partition_disjoint_complete_about_70_30(subtask):
    train, heldout = questions(subtask, "train"), questions(subtask, "heldout")
    assert not train & heldout
    assert train | heldout == questions(subtask, "all")
    assert 0.25 <= len(heldout) / (len(train) + len(heldout)) <= 0.35
    assert pool(subtask, "train") == pool(subtask, "train")  # fixed


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="continents"):
        pool("colors")
    with pytest.raises(ValueError, match="heldout"):
        pool("verbs", "test")


# ---------------------------------------------------------------------------- double_mc


def test_pairs():
    got = pairs()
    assert len(got) == 12 and len(set(got)) == 12
    assert all(a != b and a in SUBTASKS and b in SUBTASKS for a, b in got)


@pytest.mark.parametrize("intended,distractor", pairs())
@pytest.mark.parametrize("split", SPLITS)
def test_double_mc_rows(intended, distractor, split):
    n = 51
    ds = double_mc(intended, distractor, split, n=n, seed=3)
    assert len(ds) == n
    part = "train" if split == "train" else "heldout"
    allowed_i, allowed_d = questions(intended, part), questions(distractor, part)
    by_question_i = {item.question: item for item in pool(intended)}
    by_question_d = {item.question: item for item in pool(distractor)}
    seen = set()
    for row in ds:
        assert row["options"] == OPTION_TOKENS
        assert row["task"] == f"{intended}|{distractor}"
        assert (row["split"], row["intended"], row["distractor"]) == (split, intended, distractor)
        assert row["question_intended"] in allowed_i
        assert row["question_distractor"] in allowed_d
        item_i = by_question_i[row["question_intended"]]
        item_d = by_question_d[row["question_distractor"]]
        assert row["correct_intended"] == item_i.correct
        assert row["correct_distractor"] == item_d.correct
        seen.add((row["question_intended"], row["question_distractor"]))

        options = option_answers(row["prompt"])
        other = next(t for t in OPTION_TOKENS if t != row["answer"])
        assert options[row["answer"]][0] == item_i.correct
        assert options[other][0] == item_i.incorrect
        assert options[row["distractor_answer"]][1] == item_d.correct
        assert {options[t][1] for t in OPTION_TOKENS} == {item_d.correct, item_d.incorrect}
        if split == "ood":
            assert row["distractor_answer"] != row["answer"] and row["agrees"] is False
            assert options[row["answer"]][1] == item_d.incorrect
        else:
            assert row["distractor_answer"] == row["answer"] and row["agrees"] is True
            assert options[row["answer"]][1] == item_d.correct
    assert len(seen) == n  # distinct pairs
    n_a = sum(answer == " A" for answer in ds["answer"])
    assert n_a in (n // 2, n - n // 2)


@pytest.fixture
def one_item_pools(monkeypatch) -> str:
    """Pools of one item each (Kenya, soup); returns the prompt's first line."""
    kenya = Item("Which continent is Kenya in?", "Africa", "Asia")
    soup = Item('Is "The soup was cold and bland." positive or negative?', "negative", "positive")
    pools = {"continents": [kenya], "sentiment": [soup]}
    monkeypatch.setattr(dmc, "_pool_for_split", lambda subtask, split: pools[subtask])
    return (
        'Question: Which continent is Kenya in? | Is "The soup was cold and bland." positive '
        "or negative?\n"
    )


def test_double_mc_prompt_format_exact(one_item_pools):
    head = one_item_pools
    train = double_mc("continents", "sentiment", "train", n=1)[0]
    assert train["prompt"] == head + "A. Africa, negative\nB. Asia, positive\nAnswer:"
    assert (train["answer"], train["distractor_answer"], train["agrees"]) == (" A", " A", True)
    ood = double_mc("continents", "sentiment", "ood", n=1)[0]
    assert ood["prompt"] == head + "A. Africa, positive\nB. Asia, negative\nAnswer:"
    assert (ood["answer"], ood["distractor_answer"], ood["agrees"]) == (" A", " B", False)


def test_double_mc_real_prompt_shape():
    option = r"[^\n,]+, [^\n,]+"
    question = r"[^\n|]+[?.\"]"
    pattern = re.compile(
        rf"Question: {question} \| {question}\nA\. {option}\nB\. {option}\nAnswer:"
    )
    for row in double_mc("pronouns", "verbs", "test", n=40):
        assert pattern.fullmatch(row["prompt"]), row["prompt"]
        assert all(line == line.strip() for line in row["prompt"].split("\n"))


def test_double_mc_default_sizes():
    assert len(double_mc("sentiment", "continents", "train")) == 1000
    assert len(double_mc("continents", "verbs", "test")) == 200
    assert len(double_mc("verbs", "pronouns", "ood")) == 200


def test_double_mc_deterministic_by_seed():
    a = double_mc("sentiment", "pronouns", "test", n=30, seed=1)
    b = double_mc("sentiment", "pronouns", "test", n=30, seed=1)
    c = double_mc("sentiment", "pronouns", "test", n=30, seed=2)
    assert a.to_list() == b.to_list()
    assert a["prompt"] != c["prompt"]
    # test and ood draw different pairs from the same held-out items
    ood = double_mc("sentiment", "pronouns", "ood", n=30, seed=1)
    assert a["prompt"] != ood["prompt"]


def test_double_mc_errors():
    with pytest.raises(ValueError, match="sentiment"):
        double_mc("colors", "verbs", "train")
    with pytest.raises(ValueError, match="continents"):
        double_mc("verbs", "colors", "train")
    with pytest.raises(ValueError, match="different"):
        double_mc("verbs", "verbs", "train")
    with pytest.raises(ValueError, match="split"):
        double_mc("verbs", "pronouns", "validation")
    available = len(pool("verbs", "heldout")) * len(pool("continents", "heldout"))
    assert len(double_mc("verbs", "continents", "ood", n=available)) == available
    with pytest.raises(ValueError, match="only"):
        double_mc("verbs", "continents", "ood", n=available + 1)
    with pytest.raises(ValueError, match="positive integer"):
        double_mc("verbs", "continents", "test", n=0)


# ---------------------------------------------------------------------------- single_mc


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_single_mc_format_and_balance(subtask):
    ds = single_mc(subtask, "test", seed=5)
    heldout = {item.question: item for item in pool(subtask, "heldout")}
    assert len(ds) == len(heldout)
    for row in ds:
        item = heldout[row["question"]]
        options = (item.correct, item.incorrect)
        first, second = options if row["answer"] == " A" else options[::-1]
        assert row["prompt"] == f"Question: {item.question}\nA. {first}\nB. {second}\nAnswer:"
        assert row["options"] == OPTION_TOKENS
        assert (row["task"], row["split"], row["correct"]) == (subtask, "test", item.correct)
    n_a = sum(answer == " A" for answer in ds["answer"])
    assert n_a in (len(ds) // 2, len(ds) - len(ds) // 2)


def test_single_mc_train_split_n_and_seed():
    ds = single_mc("verbs", "train", n=25, seed=1)
    assert len(ds) == 25
    assert set(ds["question"]) <= questions("verbs", "train")
    assert ds.to_list() == single_mc("verbs", "train", n=25, seed=1).to_list()
    assert ds["question"] != single_mc("verbs", "train", n=25, seed=2)["question"]
    with pytest.raises(ValueError, match="only"):
        single_mc("continents", "test", n=len(pool("continents", "heldout")) + 1)
    with pytest.raises(ValueError, match="subtask"):
        single_mc("colors")


# ---------------------------------------------------------------------------- word format


def word_options(prompt: str) -> list[tuple[str, str]]:
    """[(intended answer, distractor answer), ...] parsed from a double_mc "word" prompt."""
    lines = prompt.split("\n")
    assert len(lines) == 3 and lines[1].startswith("Options: ") and lines[2] == "Answer:"
    out = []
    for option in lines[1].removeprefix("Options: ").split(", "):
        match = re.fullmatch(r"([^()]+) \(([^()]+)\)", option)
        assert match, option
        out.append((match.group(1), match.group(2)))
    assert len(out) == 2
    return out


def test_answer_formats():
    assert ANSWER_FORMATS == ("letter", "word")


def test_single_mc_word_format_exact(monkeypatch):
    kenya = Item("Which continent is Kenya in?", "Africa", "South America")
    monkeypatch.setattr(dmc, "_pool_for_split", lambda subtask, split: [kenya])
    row = single_mc("continents", "test", n=1, answer_format="word")[0]
    assert row["prompt"] == (
        "Question: Which continent is Kenya in?\nOptions: Africa, South America\nAnswer:"
    )
    assert (row["answer"], row["options"]) == (" Africa", [" Africa", " South America"])
    letter = single_mc("continents", "test", n=1)[0]
    assert letter["prompt"] == (
        "Question: Which continent is Kenya in?\nA. Africa\nB. South America\nAnswer:"
    )
    assert (letter["answer"], letter["options"]) == (" A", OPTION_TOKENS)


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_single_mc_word_format_and_balance(subtask):
    ds = single_mc(subtask, "test", seed=5, answer_format="word")
    letter = single_mc(subtask, "test", seed=5)
    heldout = {item.question: item for item in pool(subtask, "heldout")}
    assert ds["question"] == letter["question"]  # same draws as the letter format
    for row, row_letter in zip(ds, letter, strict=True):
        item = heldout[row["question"]]
        correct_first = row_letter["answer"] == " A"
        first, second = (item.correct, item.incorrect)[:: 1 if correct_first else -1]
        assert row["prompt"] == f"Question: {item.question}\nOptions: {first}, {second}\nAnswer:"
        assert row["options"] == [f" {first}", f" {second}"]
        assert row["answer"] == f" {item.correct}" and row["answer"] in row["options"]
    n_first = sum(row["answer"] == row["options"][0] for row in ds)
    assert n_first in (len(ds) // 2, len(ds) - len(ds) // 2)


def test_double_mc_word_format_exact(one_item_pools):
    head = one_item_pools
    train = double_mc("continents", "sentiment", "train", n=1, answer_format="word")[0]
    assert train["prompt"] == head + "Options: Africa (negative), Asia (positive)\nAnswer:"
    assert train["options"] == [" Africa", " Asia"]
    assert (train["answer"], train["distractor_answer"], train["agrees"]) == (
        " Africa",
        " Africa",
        True,
    )
    ood = double_mc("continents", "sentiment", "ood", n=1, answer_format="word")[0]
    assert ood["prompt"] == head + "Options: Africa (positive), Asia (negative)\nAnswer:"
    assert ood["options"] == [" Africa", " Asia"]
    assert (ood["answer"], ood["distractor_answer"], ood["agrees"]) == (" Africa", " Asia", False)


@pytest.mark.parametrize("intended,distractor", pairs())
@pytest.mark.parametrize("split", SPLITS)
def test_double_mc_word_rows(intended, distractor, split):
    n = 51
    ds = double_mc(intended, distractor, split, n=n, seed=3, answer_format="word")
    letter = double_mc(intended, distractor, split, n=n, seed=3)
    by_question_i = {item.question: item for item in pool(intended)}
    by_question_d = {item.question: item for item in pool(distractor)}
    for row, row_letter in zip(ds, letter, strict=True):
        # same pairs and order as the letter format
        for key in ("question_intended", "question_distractor", "agrees"):
            assert row[key] == row_letter[key]
        item_i = by_question_i[row["question_intended"]]
        item_d = by_question_d[row["question_distractor"]]
        options = word_options(row["prompt"])
        assert row["options"] == [f" {intended_answer}" for intended_answer, _ in options]
        assert row["answer"] == f" {item_i.correct}" and row["answer"] in row["options"]
        correct_first = row_letter["answer"] == " A"
        assert (row["answer"] == row["options"][0]) == correct_first
        chosen = options[row["options"].index(row["answer"])]
        other = options[1 - row["options"].index(row["answer"])]
        assert other[0] == item_i.incorrect
        assert {chosen[1], other[1]} == {item_d.correct, item_d.incorrect}
        holder = options[row["options"].index(row["distractor_answer"])]
        assert holder[1] == item_d.correct
        if split == "ood":
            # following the distractor gives the intended-incorrect word
            assert chosen[1] == item_d.incorrect
            assert row["distractor_answer"] == f" {item_i.incorrect}"
            assert row["agrees"] is False
        else:
            assert chosen[1] == item_d.correct
            assert row["distractor_answer"] == row["answer"] and row["agrees"] is True
    n_first = sum(row["answer"] == row["options"][0] for row in ds)
    assert n_first in (n // 2, n - n // 2)


@pytest.mark.parametrize("intended,distractor", pairs())
def test_double_mc_word_options_differ_in_first_word(intended, distractor):
    """Evaluation compares each option's first token, so the first words must differ."""
    for split in SPLITS:
        part = "train" if split == "train" else "heldout"
        available = len(pool(intended, part)) * len(pool(distractor, part))
        ds = double_mc(intended, distractor, split, n=available, answer_format="word")
        for first, second in ds["options"]:
            assert first.startswith(" ") and second.startswith(" ")
            assert first.split()[0] != second.split()[0], (first, second)


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_item_answers_differ_in_first_word(subtask):
    for item in pool(subtask):
        assert item.correct.split()[0] != item.incorrect.split()[0], item


def test_answer_format_errors():
    with pytest.raises(ValueError, match="letter.*word"):
        single_mc("verbs", answer_format="pronoun")
    with pytest.raises(ValueError, match="letter.*word"):
        double_mc("verbs", "pronouns", "train", answer_format="A")
    with pytest.raises(TypeError):
        single_mc("verbs", "test", None, 0, "word")  # keyword-only


# ---------------------------------------------------------------------------- contrast sets


def task_sentences() -> set[str]:
    """Every sub-task item as a plain sentence (filled blanks, quoted statements, questions)."""
    out = set()
    for subtask in SUBTASKS:
        for item in pool(subtask):
            out.add(item.question)
            if '"' in item.question:
                sentence = quoted(item.question)
                out.add(sentence)
                for answer in (item.correct, item.incorrect):
                    out.add(sentence.replace("___", answer))
    return out


SIDES = {
    "sentiment": {"positive", "negative"},
    "verbs": {"plural", "singular"},
    "pronouns": {"female", "male"},
    "continents": {"europe", "asia"},
}


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_contrast_sets(subtask):
    sets = contrast_set(subtask)
    assert set(sets) == SIDES[subtask]
    first, second = sets.values()
    assert len(first) >= 60 and len(second) >= 60
    assert len(set(first)) == len(first) and len(set(second)) == len(second)
    assert not set(first) & set(second)
    items = task_sentences()
    for sentence in first + second:
        assert sentence not in items
        assert "Question:" not in sentence and "Answer:" not in sentence and "___" not in sentence
        assert sentence[0].isupper() and sentence.endswith((".", "!"))


def test_contrast_set_sides_carry_the_concept():
    sets = contrast_set("pronouns")
    assert all(re.search(r"\b(She|her|sister|grandmother|woman|girl)\b", s) for s in sets["female"])
    assert all(re.search(r"\b(He|his|brother|grandfather|man|boy)\b", s) for s in sets["male"])
    verbs = contrast_set("verbs")
    assert all(s.split()[1].endswith("s") for s in verbs["plural"])
    assert not any(s.split()[1].endswith("s") for s in verbs["singular"])


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_contrast_set_seed_and_n(subtask):
    full = contrast_set(subtask, seed=4)
    assert full == contrast_set(subtask, seed=4)
    other = contrast_set(subtask, seed=5)
    assert full != other
    assert {k: sorted(v) for k, v in full.items()} == {k: sorted(v) for k, v in other.items()}
    head = contrast_set(subtask, n=10, seed=4)
    assert head == {side: sentences[:10] for side, sentences in full.items()}
    with pytest.raises(ValueError, match="only"):
        contrast_set(subtask, n=1000)
    with pytest.raises(ValueError):
        contrast_set("colors")


def test_intended_question_second_exact(one_item_pools):
    swapped = (
        'Question: Is "The soup was cold and bland." positive or negative? | Which continent '
        "is Kenya in?\n"
    )
    ood = double_mc("continents", "sentiment", "ood", n=1, intended_position="second")[0]
    assert ood["prompt"] == swapped + "A. positive, Africa\nB. negative, Asia\nAnswer:"
    assert (ood["answer"], ood["distractor_answer"], ood["intended_position"]) == (
        " A",
        " B",
        "second",
    )
    word = double_mc(
        "continents", "sentiment", "ood", n=1, answer_format="word", intended_position="second"
    )[0]
    assert word["prompt"] == swapped + "Options: Africa (positive), Asia (negative)\nAnswer:"
    assert (word["answer"], word["distractor_answer"]) == (" Africa", " Asia")


@pytest.mark.parametrize("split", SPLITS)
def test_intended_second_keeps_items_and_answers(split):
    first = double_mc("pronouns", "sentiment", split, n=30, answer_format="word")
    second = double_mc(
        "pronouns", "sentiment", split, n=30, answer_format="word", intended_position="second"
    )
    keep = ("answer", "options", "question_intended", "question_distractor", "agrees")
    assert [{k: r[k] for k in keep} for r in first] == [{k: r[k] for k in keep} for r in second]
    for r in second:
        assert r["prompt"].startswith(f"Question: {r['question_distractor']} | ")
    with pytest.raises(ValueError, match="intended_position"):
        double_mc("pronouns", "sentiment", split, n=2, intended_position="middle")
