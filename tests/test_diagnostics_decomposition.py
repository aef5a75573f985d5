"""training_decomposition: one fine-tune per condition, cached, tabulated; bad input."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

import caft_tl as ct
from caft_tl.diagnostics import (
    condition_names,
    decomposition_figure,
    decomposition_interventions,
    decomposition_table,
    training_decomposition,
)
from caft_tl.directions import ConceptSet
from caft_tl.interventions import Ablation, Steering

HOOK = "blocks.0.hook_resid_post"


def _concepts(d: int = 64) -> ConceptSet:
    g = torch.Generator().manual_seed(0)
    return ConceptSet({HOOK: torch.linalg.qr(torch.randn(d, 2, generator=g))[0].T})


def test_conditions_map_to_the_right_interventions():
    names = condition_names((3.0,))
    assert names == ["plain", "zero", "detached", "gradient", "steer+3", "steer-3"]
    mean = {HOOK: torch.ones(64)}
    runs = decomposition_interventions(_concepts(), mean, ks=(3.0,))
    assert runs["plain"] is None
    assert isinstance(runs["detached"], Ablation) and runs["detached"].mode == "detached"
    assert isinstance(runs["steer-3"], Steering) and runs["steer-3"].coef == -3.0
    assert runs["steer+3"].coef == 3.0
    with pytest.raises(ValueError, match="needs mean"):
        decomposition_interventions(_concepts(), None, ks=(3.0,))
    with pytest.raises(ValueError, match="unknown condition"):
        decomposition_interventions(_concepts(), mean, conditions=["plain", "shuffled"])
    with pytest.raises(ValueError, match="> 0"):
        decomposition_interventions(_concepts(), mean, ks=(-3.0,))


def test_decomposition_trains_each_condition_once_and_reuses(tokenizer, tmp_path, monkeypatch):
    model = ct.models.tiny(tokenizer=tokenizer, seed=1)
    train = ct.tasks.gender_pronoun("train", n=8, answer_format="pronoun")
    splits = {
        "test": ct.tasks.gender_pronoun("test", n=6, answer_format="pronoun"),
        "ood": ct.tasks.gender_pronoun("ood", n=6, answer_format="pronoun"),
    }
    cfg = ct.TrainConfig(max_steps=2, lr=1e-3, batch_size=4, progress=False)
    conditions = ["plain", "zero", "gradient", "steer-3"]
    df = training_decomposition(
        model, train, _concepts(), splits, cfg, tmp_path, seeds=[0, 1],
        conditions=conditions, progress=False,
    )  # fmt: skip
    assert len(df) == 4 * 2 * 2
    assert set(df["condition"]) == set(conditions) and set(df["split"]) == {"test", "ood"}
    assert df["n"].eq(6).all() and df["accuracy"].between(0, 1).all()
    # Runs are evaluated and their weights removed; the record stays.
    assert not (tmp_path / "runs" / "s0" / "zero" / "final").exists()
    assert (tmp_path / "runs" / "s0" / "zero" / "metrics.jsonl").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished condition was trained again")

    monkeypatch.setattr("caft_tl.compare.finetune", no_training)
    again = training_decomposition(
        model, train, _concepts(), splits, cfg, tmp_path, seeds=[0, 1],
        conditions=conditions, progress=False,
    )  # fmt: skip
    assert again.equals(df)

    table = decomposition_table(df)
    assert list(table.index) == conditions
    assert {"test_mean", "ood_min", "ood_max"} <= set(table.columns)
    assert table["n_seeds"].eq(2).all()
    fig = decomposition_figure(df)
    assert [trace.name for trace in fig.data] == ["test", "ood"]

    # Fewer seeds or conditions reuse the cached runs; other training settings are refused.
    fewer = training_decomposition(
        model, train, _concepts(), splits, cfg, tmp_path, seeds=[1], conditions=conditions[:2],
        progress=False,
    )  # fmt: skip
    assert len(fewer) == 2 * 2
    with pytest.raises(ValueError, match="another configuration"):
        training_decomposition(
            model, train, _concepts(), splits, dataclasses.replace(cfg, lr=2e-3), tmp_path,
            seeds=[0], conditions=conditions, progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="eval_data is empty"):
        training_decomposition(model, train, _concepts(), {}, cfg, tmp_path / "x")


def test_kept_models_are_not_loaded_again_when_evaluations_are_cached(
    tokenizer, tmp_path, monkeypatch
):
    model = ct.models.tiny(tokenizer=tokenizer, seed=1)
    train = ct.tasks.gender_pronoun("train", n=8, answer_format="pronoun")
    splits = {"ood": ct.tasks.gender_pronoun("ood", n=6, answer_format="pronoun")}
    cfg = ct.TrainConfig(max_steps=1, lr=1e-3, batch_size=4, progress=False)
    args = (model, train, _concepts(), splits, cfg, tmp_path)
    first = training_decomposition(
        *args, conditions=["plain", "zero"], keep_models=True, progress=False
    )
    assert (tmp_path / "runs" / "s0" / "zero" / "final").is_dir()

    def no_run(*a, **k):
        raise AssertionError("a kept, evaluated run was loaded or trained again")

    monkeypatch.setattr("caft_tl.compare.run_condition", no_run)
    again = training_decomposition(
        *args, conditions=["plain", "zero"], keep_models=True, progress=False
    )
    assert again.equals(first)
    # A kept model that is gone is trained again (keep_models promises it on disk).
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "runs" / "s0" / "zero" / "final")
    training_decomposition(*args, conditions=["plain", "zero"], keep_models=True, progress=False)
    assert (tmp_path / "runs" / "s0" / "zero" / "final").is_dir()
