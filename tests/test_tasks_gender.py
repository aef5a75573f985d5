"""The gender pronoun task: template hygiene, split design, balance, determinism."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from caft_tl.tasks.gender import (
    DEFAULT_N,
    FEMALE_PROFESSIONS,
    HELDOUT_TEMPLATE_IDS,
    MALE_PROFESSIONS,
    TEMPLATES,
    TRAIN_TEMPLATE_IDS,
    gender_contrast,
    gender_pronoun,
    template_ids,
)

BLANK = "_____"
GENDERED = {
    "he", "she", "him", "her", "his", "hers", "himself", "herself", "man", "woman", "men",
    "women", "boy", "girl", "boys", "girls", "mr", "mrs", "ms", "sir", "madam",
    "father", "mother", "dad", "mum", "mom", "son", "daughter", "brother", "sister",
    "husband", "wife", "uncle", "aunt", "nephew", "niece", "king", "queen", "prince",
    "princess", "lady", "ladies", "gentleman", "gentlemen", "guy", "guys", "gal", "bride",
    "groom", "boyfriend", "girlfriend", "grandfather", "grandmother", "grandpa", "grandma",
    "landlord", "landlady", "actress", "waitress", "hostess", "widow", "widower", "hero",
    "heroine", "lord", "duke", "duchess", "emperor", "empress", "schoolboy", "schoolgirl",
    "stepfather", "stepmother",
}  # fmt: skip
FEMALE_NAMES = {
    "emma", "sarah", "anna", "maria", "lucy", "olivia", "grace", "hannah", "laura", "rachel",
}  # fmt: skip
MALE_NAMES = {
    "james", "david", "tom", "michael", "peter", "john", "daniel", "mark", "paul", "robert",
}  # fmt: skip
FEMALE_WORDS = {
    "she", "her", "hers", "herself", "woman", "women", "girl", "girls", "mother", "mum",
    "sister", "aunt", "niece", "daughter", "grandmother", "stepmother", "wife", "girlfriend",
    "queen", "princess", "duchess", "empress", "lady", "ladies", "bride", "widow", "heroine",
    "schoolgirl", "mrs",
} | FEMALE_NAMES  # fmt: skip
MALE_WORDS = {
    "he", "him", "his", "himself", "man", "men", "boy", "boys", "father", "dad", "brother",
    "uncle", "nephew", "son", "grandfather", "stepfather", "husband", "boyfriend", "king",
    "prince", "duke", "emperor", "gentleman", "gentlemen", "groom", "widower", "hero",
    "schoolboy", "mr",
} | MALE_NAMES  # fmt: skip
PROFESSIONS = MALE_PROFESSIONS + FEMALE_PROFESSIONS
ALL_SPLITS = ("train", "test", "ood")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def rows(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def datasets():
    return {split: rows(gender_pronoun(split, n=400)) for split in ALL_SPLITS}


# -- content ----------------------------------------------------------------------------


def test_counts_and_professions():
    cases = Counter(case for case, _ in TEMPLATES)
    assert len(TEMPLATES) >= 220
    assert set(cases) == {"nominative", "object"}
    assert abs(cases["nominative"] - cases["object"]) <= 0.1 * len(TEMPLATES)
    assert len(MALE_PROFESSIONS) >= 15 and len(FEMALE_PROFESSIONS) >= 15
    assert not set(MALE_PROFESSIONS) & set(FEMALE_PROFESSIONS)
    assert len(set(PROFESSIONS)) == len(PROFESSIONS)
    for p in PROFESSIONS:
        assert p == p.lower() and 1 <= len(p.split()) <= 2, p
        assert not set(words(p)) & GENDERED, p


def test_templates_are_clean():
    texts = [t for _, t in TEMPLATES]
    assert len(set(texts)) == len(texts), "duplicate templates"
    profession_words = {w for p in PROFESSIONS for w in p.split()}
    for case, text in TEMPLATES:
        assert case in ("nominative", "object")
        assert text.count(BLANK) == 1 and "______" not in text, text
        assert text.count("{profession}") == 1, text
        assert re.search(r"\b[Tt]he \{profession\}", text), text
        assert text[-1] in ".!?", text
        assert not text.startswith(BLANK), text
        found = set(words(text.replace("{profession}", ""))) - {"profession"}
        assert not found & GENDERED, (text, found & GENDERED)
        # No other person named by a profession of the lists: the blank must refer to one.
        plain = {w.removesuffix("s") for w in found} | found
        assert not plain & profession_words, (text, plain & profession_words)
        assert 8 <= len(text.split()) <= 25, text


def test_blank_position_matches_case():
    """Objects never precede a noun (where "her" could read as possessive); subjects
    precede a verb, never a determiner, preposition or punctuation."""
    after_object = {
        "to", "for", "in", "about", "at", "with", "a", "on", "by", "after", "up", "again",
        "outside", "since", "warmly", "completely", "carefully", "afterwards", "loudly",
        "tomorrow", "immediately", "upstairs", "towards", "everywhere", "soon", "gently",
        "goodbye", "before", "alone", "into", "unanimously", "all", "through", "around",
        "patiently", "go", "near",
    }  # fmt: skip
    not_after_subject = {"the", "a", "an", "to", "of", "for", "with", "at", "in", "on", "home"}
    for case, text in TEMPLATES:
        after = text.split(BLANK)[1]
        nxt = words(after)[0] if words(after) else ""
        if case == "object":
            assert after[:1] in ",.!?" or (after[:1] == " " and nxt in after_object), text
        else:
            assert after[:1] == " " and after[1].isalpha() and nxt not in not_after_subject, text


# -- splits -----------------------------------------------------------------------------


def test_template_partition_is_fixed_and_disjoint():
    train, held = set(TRAIN_TEMPLATE_IDS), set(HELDOUT_TEMPLATE_IDS)
    assert not train & held
    assert train | held == set(range(len(TEMPLATES)))
    assert 0.25 <= len(held) / len(TEMPLATES) <= 0.35
    for case in ("nominative", "object"):
        assert any(TEMPLATES[i][0] == case for i in held)
    assert template_ids("train") == TRAIN_TEMPLATE_IDS
    assert template_ids("test") == template_ids("ood") == HELDOUT_TEMPLATE_IDS


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_draw_from_their_templates(seed):
    n = {"train": 2000, "test": 1000, "ood": 1000}
    used = {s: {r["template_id"] for r in rows(gender_pronoun(s, n=n[s], seed=seed))} for s in n}
    assert used["train"] <= set(TRAIN_TEMPLATE_IDS)
    assert used["test"] <= set(HELDOUT_TEMPLATE_IDS)
    assert used["ood"] <= set(HELDOUT_TEMPLATE_IDS)
    assert not used["train"] & (used["test"] | used["ood"])


def test_full_split_covers_every_combination():
    ds = gender_pronoun("test", n=len(HELDOUT_TEMPLATE_IDS) * len(PROFESSIONS))
    combos = {(r["template_id"], r["profession"]) for r in rows(ds)}
    assert len(combos) == len(ds)
    with pytest.raises(ValueError, match="only"):
        gender_pronoun("test", n=len(ds) + 1)


def test_stereotype_agreement(datasets):
    for split, rs in datasets.items():
        for r in rs:
            assert r["split"] == split and r["task"] == "gender_pronoun"
            expected = MALE_PROFESSIONS if r["stereotype"] == "male" else FEMALE_PROFESSIONS
            assert r["profession"] in expected
            if split == "ood":
                assert r["gender"] != r["stereotype"] and r["agrees"] is False
            else:
                assert r["gender"] == r["stereotype"] and r["agrees"] is True


def test_pronouns_and_distractors(datasets):
    case_of = {"he": "nominative", "she": "nominative", "him": "object", "her": "object"}
    gender_of = {"he": "male", "him": "male", "she": "female", "her": "female"}
    for rs in datasets.values():
        for r in rs:
            p, d = r["pronoun"], r["distractor"]
            assert case_of[p] == r["case"] == TEMPLATES[r["template_id"]][0]
            assert gender_of[p] == r["gender"]
            assert case_of[d] != case_of[p] and gender_of[d] != gender_of[p]


def test_prompt_format_and_answer(datasets):
    for rs in datasets.values():
        for r in rs:
            lines = r["prompt"].split("\n")
            assert lines[0] == "Choose the option corresponding to the correct pronoun."
            assert lines[1] == f"Question: {r['sentence']}"
            assert lines[4] == "Answer:" and len(lines) == 5
            assert r["prompt"] == r["prompt"].strip()
            options = {"A": lines[2].removeprefix("A) "), "B": lines[3].removeprefix("B) ")}
            assert lines[2].startswith("A) ") and lines[3].startswith("B) ")
            assert sorted(options.values()) == sorted([r["pronoun"], r["distractor"]])
            assert r["answer"] in (" A", " B") and r["options"] == [" A", " B"]
            assert options[r["answer"].strip()] == r["pronoun"]
            template = TEMPLATES[r["template_id"]][1]
            filled = template.replace("{profession}", r["profession"])
            assert r["sentence"] == filled[0].upper() + filled[1:]
            assert r["sentence"][0].isupper() and r["sentence"].count(BLANK) == 1


# -- balance and determinism -----------------------------------------------------------


@pytest.mark.parametrize("split", ALL_SPLITS)
@pytest.mark.parametrize("n", [1, 2, 7, 50, 101, 200])
def test_balance(split, n):
    rs = rows(gender_pronoun(split, n=n, seed=3))
    n_a = sum(r["answer"] == " A" for r in rs)
    assert n_a in (n // 2, n - n // 2)
    male = sum(r["stereotype"] == "male" for r in rs)
    assert abs(male - (n - male)) <= (0 if n % 2 == 0 else 1)
    # every prefix is close to balanced (the lists are interleaved, not concatenated)
    for k in range(1, n + 1):
        prefix_male = sum(r["stereotype"] == "male" for r in rs[:k])
        assert abs(2 * prefix_male - k) <= 1


def test_answer_letter_balanced_within_stereotype(datasets):
    for rs in datasets.values():
        for s in ("male", "female"):
            sub = [r for r in rs if r["stereotype"] == s]
            assert abs(2 * sum(r["answer"] == " A" for r in sub) - len(sub)) <= 1


def test_defaults():
    assert DEFAULT_N == {"train": 1000, "test": 200, "ood": 200}
    assert len(gender_pronoun("test")) == 200
    assert len(gender_pronoun("train")) == 1000


def test_deterministic():
    a, b = gender_pronoun("ood", n=60, seed=5), gender_pronoun("ood", n=60, seed=5)
    assert rows(a) == rows(b)
    c = gender_pronoun("ood", n=60, seed=6)
    assert [r["prompt"] for r in rows(a)] != [r["prompt"] for r in rows(c)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        gender_pronoun("validation")
    with pytest.raises(ValueError, match="n=100000"):
        gender_pronoun("train", n=100000)
    with pytest.raises(ValueError):
        gender_pronoun("test", n=0)


# -- contrast sets ----------------------------------------------------------------------


def test_gender_contrast_pairs():
    c = gender_contrast()
    female, male = c["female"], c["male"]
    assert set(c) == {"female", "male"}
    assert len(female) == len(male) >= 100
    assert len(set(zip(female, male, strict=True))) == len(female), "duplicate pairs"
    profession_words = {w for p in PROFESSIONS for w in p.split()}
    for f, m in zip(female, male, strict=True):
        assert f != m
        fw, mw = words(f), words(m)
        assert len(fw) == len(mw)
        # differ only in gendered words, each swapped for the matching other-gender word
        for a, b in zip(fw, mw, strict=True):
            assert a == b or (a in FEMALE_WORDS and b in MALE_WORDS), (f, m)
        assert set(fw) & FEMALE_WORDS and not set(fw) & MALE_WORDS, f
        assert set(mw) & MALE_WORDS and not set(mw) & FEMALE_WORDS, m
        for text in (f, m):
            assert BLANK not in text and "Answer:" not in text and "Question:" not in text
            assert not {w.removesuffix("s") for w in words(text)} & profession_words, text
            assert not set(words(text)) & profession_words, text


def test_gender_contrast_n_and_seed():
    full = gender_contrast(seed=0)
    assert gender_contrast(seed=0) == full
    other = gender_contrast(seed=1)
    assert other["female"] != full["female"]
    assert sorted(other["female"]) == sorted(full["female"])
    few = gender_contrast(n=10, seed=0)
    assert few["female"] == full["female"][:10] and few["male"] == full["male"][:10]
    with pytest.raises(ValueError):
        gender_contrast(n=len(full["female"]) + 1)


def test_test_and_ood_are_paired():
    test, ood = gender_pronoun("test", n=40, seed=3), gender_pronoun("ood", n=40, seed=3)
    for a, b in zip(test, ood, strict=True):
        assert (a["sentence"], a["profession"], a["answer"]) == (
            b["sentence"],
            b["profession"],
            b["answer"],
        )
        assert a["case"] == b["case"] and a["gender"] != b["gender"]


def test_two_professions_design():
    from caft_tl.tasks import gender_two_professions

    train, test, ood = (gender_two_professions(s) for s in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (286, 190, 190)
    assert set(train["profession"]) == {"doctor", "nurse"}
    for row in train:  # the profession alone predicts the pronoun's gender
        assert row["gender"] == ("male" if row["profession"] == "doctor" else "female")
    assert all(train["agrees"]) and all(test["agrees"]) and not any(ood["agrees"])
    assert not set(train["template_id"]) & set(test["template_id"])
    for t, o in zip(test, ood, strict=True):  # row i: same sentence, other gender
        assert t["sentence"] == o["sentence"] and t["gender"] != o["gender"]
        assert t["case"] == o["case"]
    for ds in (train, test):
        for profession in ("doctor", "nurse"):
            rows = [r for r in ds if r["profession"] == profession]
            n_first = sum(r["answer"] == r["options"][0] for r in rows)
            assert n_first in (len(rows) // 2, len(rows) - len(rows) // 2)
    other = gender_two_professions("ood", n=10, male="pilot", female="florist", seed=1)
    assert set(other["profession"]) == {"pilot", "florist"} and len(other) == 10
    assert other["prompt"][0].splitlines()[2].startswith("Options: ")
    with pytest.raises(ValueError, match="differ"):
        gender_two_professions("train", male="nurse", female="nurse")
    with pytest.raises(ValueError, match="only 190"):
        gender_two_professions("test", n=191)
