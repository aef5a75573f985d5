"""multiple_choice: accuracy from option logits and over the vocabulary, groups, errors."""

from __future__ import annotations

import pytest
import torch

import caft_tl as ct
from caft_tl.data import DataError
from caft_tl.directions import ConceptSet
from caft_tl.evals import multiple_choice, option_token_ids
from caft_tl.interventions import Steering


@pytest.fixture(scope="module")
def model(tokenizer):
    return ct.models.tiny(tokenizer=tokenizer, seed=1, n_layers=2, d_model=32, n_heads=4, d_mlp=64)


@pytest.fixture(scope="module")
def data():
    rows = ct.tasks.gender_pronoun("test", n=12).to_list()
    rows += ct.tasks.gender_pronoun("ood", n=8, answer_format="pronoun").to_list()
    return rows


def manual(model, row) -> tuple[bool, bool]:
    tok = model.tokenizer
    ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([ids]))[0, -1]
    option_ids = [
        tok(row["prompt"] + o, add_special_tokens=False)["input_ids"][-1] for o in row["options"]
    ]
    correct = row["options"].index(row["answer"])
    best = max(range(len(option_ids)), key=lambda i: logits[option_ids[i]].item())
    return best == correct, int(logits.argmax()) == option_ids[correct]


def test_accuracy_matches_a_manual_computation(model, data):
    r = multiple_choice(model, data, batch_size=5, return_examples=True)
    expected = [manual(model, row) for row in data]
    assert r["examples"]["correct"].tolist() == [e[0] for e in expected]
    assert r["examples"]["vocab_correct"].tolist() == [e[1] for e in expected]
    assert r["n"] == len(data) and r["accuracy"] == pytest.approx(
        sum(e[0] for e in expected) / len(data)
    )
    # Padding and batching do not change the answers.
    one = multiple_choice(model, data, batch_size=1, return_examples=True)
    assert one["examples"]["margin"].tolist() == pytest.approx(
        r["examples"]["margin"].tolist(), abs=1e-4
    )


def test_groups_by_split_with_counts(model, data):
    r = multiple_choice(model, data)
    groups = {g["split"]: g for g in r["groups"]}
    assert set(groups) == {"test", "ood"}
    assert groups["test"]["n"] == 12 and groups["ood"]["n"] == 8
    total = groups["test"]["n_correct"] + groups["ood"]["n_correct"]
    assert total == r["n_correct"]


def test_an_intervention_applies_and_is_removed(model, data):
    plain = multiple_choice(model, data, return_examples=True)
    g = torch.Generator().manual_seed(0)
    steer = Steering(
        None, coef=50.0, vectors={"blocks.1.hook_resid_post": torch.randn(32, generator=g)}
    )
    steered = multiple_choice(model, data, intervention=steer, return_examples=True)
    assert steered["examples"]["margin"].tolist() != pytest.approx(
        plain["examples"]["margin"].tolist()
    )
    assert not model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks  # removed afterwards
    again = multiple_choice(model, data, return_examples=True)
    assert again["examples"]["margin"].tolist() == pytest.approx(
        plain["examples"]["margin"].tolist()
    )
    _ = ConceptSet  # steering by explicit vectors needs no ConceptSet


def test_bad_input_is_a_clear_error(model, tokenizer):
    with pytest.raises(DataError, match="empty"):
        multiple_choice(model, [])
    with pytest.raises(DataError, match="missing"):
        multiple_choice(model, [{"prompt": "Hi", "answer": " A"}])
    with pytest.raises(DataError, match="not among"):
        multiple_choice(model, [{"prompt": "Hi", "answer": " C", "options": [" A", " B"]}])
    with pytest.raises(DataError, match="first token"):
        option_token_ids(tokenizer, "Answer:", [" South America", " South Africa"])
    with pytest.raises(DataError, match="merges"):
        option_token_ids(tokenizer, "Answer:", [" A", ""])


def test_multi_token_options_are_scored_by_their_first_token(tokenizer):
    ids = option_token_ids(tokenizer, "Answer:", [" South America", " North America"])
    assert ids == [tokenizer(" South")["input_ids"][0], tokenizer(" North")["input_ids"][0]]


def test_every_built_in_task_can_be_scored(tokenizer):
    rows = []
    for fmt in ("letter", "pronoun"):
        rows += ct.tasks.gender_pronoun("ood", n=40, answer_format=fmt).to_list()
    for fmt in ("letter", "word"):
        for intended, distractor in ct.tasks.double_mc_pairs():
            rows += ct.tasks.double_mc(
                intended, distractor, "ood", n=20, answer_format=fmt
            ).to_list()
        for sub in ct.tasks.SUBTASKS:
            rows += ct.tasks.single_mc(sub, "test", answer_format=fmt).to_list()
    for row in rows:
        option_token_ids(tokenizer, row["prompt"], row["options"])
