"""The end-to-end study (caft-tl demo) on a tiny model: every stage, reuse, report."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

import caft_tl as ct
from caft_tl.demo import DemoConfig, run_demo, summary_table
from caft_tl.viz import search_table

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def small(**kw) -> DemoConfig:
    values = dict(
        seeds=[0, 1], n_train=16, n_eval=8, max_steps=2, lr=1e-3, warmup_steps=0,
        learned_less_step=1, hooks=HOOKS, k_pcs=4, n_direction_prompts=8, n_chat_prompts=8,
        n_hint_pairs=16, max_per_hook=1, top_examples=2,
    )  # fmt: skip
    return DemoConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def model(tokenizer):
    return ct.models.tiny(tokenizer=tokenizer, seed=0, n_layers=2, d_model=32, n_heads=4, d_mlp=64)


@pytest.fixture(scope="module")
def study(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, small(), model=model, echo=False)


def test_every_method_is_evaluated_on_both_splits(study):
    out, results = study
    methods = {(s["method"], s["split"]): s for s in results["summary"]}
    expected = {"base", "plain", "plain@step1", "caft-pca", "random", "top"}
    assert {m for m, _ in methods} == expected
    for method in expected:
        for split in ("test", "ood"):
            s = methods[(method, split)]
            assert s["n_per_seed"] == 8 and 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 1.0
            assert s["n_seeds"] == (1 if method == "base" else 2)
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    table = summary_table(results)
    assert list(table.columns) == ["test", "ood"] and "caft-pca" in table.index


def test_selected_directions_are_recorded_and_used(study):
    out, results = study
    d = results["directions"]["pca"]
    assert d["n_selected"] >= 1 and isinstance(d["fallback"], bool)
    assert len(d["scores"]) == 4 * len(HOOKS)  # every PC was scored against the hints
    chosen = ct.ConceptSet.load(out / "concepts" / "pca")
    assert chosen.n_directions == d["n_selected"]
    saved = json.loads((out / "runs" / "s0" / "caft-pca" / "run.json").read_text())
    assert saved  # the CAFT run exists beside plain, random and top
    # Disk: resumable state always deleted, models too except the one the directions use.
    assert (out / "runs" / "s0" / "plain" / "final").is_dir()
    for seed, name in [("s0", "caft-pca"), ("s1", "plain"), ("s1", "random"), ("s1", "top")]:
        folder = out / "runs" / seed / name
        assert (folder / "metrics.jsonl").is_file()
        assert not (folder / "final").exists() and not (folder / "checkpoint").exists()
    assert not list((out / "runs").glob("*/*/step-*"))


def test_report_is_self_contained(study):
    out, _ = study
    page = (out / "report.html").read_text()
    assert "Plotly" in page and "caft-pca" in page and "Selected directions" in page
    assert 'src="http' not in page and "cdn." not in page.lower().split("</script>")[-1]
    # The search that chose the default task, every candidate and those not run included.
    assert "How this task was chosen" in page and "screened out" in page
    # Candidates not run are listed exactly when the shipped table has some (none since
    # amendment 4 ran them all).
    assert ("Pre-registered but not run" in page) == bool(search_table()["not_run"])


def test_a_second_run_reuses_every_artefact(study, model, monkeypatch):
    out, results = study

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("caft_tl.compare.finetune", no_training)
    again = run_demo(out, small(), model=model, echo=False)
    assert again["evals"] == results["evals"]


def test_another_config_in_the_same_folder_is_refused(study, model):
    out, _ = study
    with pytest.raises(ValueError, match="another configuration"):
        run_demo(out, small(lr=2e-3), model=model, echo=False)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="seeds"):
        DemoConfig(seeds=[])
    with pytest.raises(ValueError, match="learned_less_step"):
        DemoConfig(learned_less_step=100)


def test_cli_builds_the_config_and_prints_the_table(monkeypatch, tmp_path, capsys, study):
    from caft_tl import cli

    _, results = study
    seen = {}

    def fake_run(out, cfg, *, model=None):
        seen["out"], seen["cfg"] = out, cfg
        return results

    monkeypatch.setattr("caft_tl.demo.run_demo", fake_run)
    monkeypatch.setattr("caft_tl.cli.common.load", lambda name, device, dtype=None: None)
    assert cli.main(["demo", "--quick", "--seeds", "3", "4", "--out", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert cfg.seeds == [3, 4] and cfg.max_steps == DemoConfig.quick().max_steps
    assert "caft-pca" in capsys.readouterr().out
    assert cli.main(["demo", "--steps", "1", "--out", str(tmp_path)]) == 2  # warm-up > steps


def test_double_multiple_choice_runs_through_the_same_study(model, tmp_path):
    cfg = small(task="double_mc:sentiment|verbs", seeds=[0], learned_less_step=None)
    results = run_demo(tmp_path, cfg, model=model, echo=False)
    assert results["task"] == "double_mc:sentiment|verbs"
    assert results["hints"] == list(ct.tasks.contrast_set("verbs"))  # the distractor's concept
    assert {s["method"] for s in results["summary"]} == {
        "base",
        "plain",
        "caft-pca",
        "random",
        "top",
    }
    assert "Double multiple choice" in (tmp_path / "report.html").read_text()
    with pytest.raises(ValueError, match="double_mc:INTENDED"):
        DemoConfig(task="double_mc:sentiment")


def test_demo_concepts_alone_then_the_full_study_shares_the_work(model, tmp_path, monkeypatch):
    from caft_tl.demo import demo_concepts

    chosen = demo_concepts(tmp_path, small(seeds=[0]), model=model, echo=False)
    assert chosen.n_directions >= 1 and set(chosen.hooks) <= set(HOOKS)
    plain = tmp_path / "runs" / "s0" / "plain"
    assert (plain / "final").exists() and (plain / "step-1").exists()
    assert not (plain / "checkpoint").exists()
    calls = []
    real = ct.compare.finetune
    monkeypatch.setattr(
        "caft_tl.compare.finetune", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    results = run_demo(tmp_path, small(seeds=[0]), model=model, echo=False)
    assert len(calls) == 3  # caft, random, top: the plain run came from demo_concepts
    selected = ct.ConceptSet.load(tmp_path / "concepts" / "pca")
    assert selected.labels == chosen.labels
    assert "plain@step1/s0" in results["evals"]
    assert (
        demo_concepts(tmp_path, small(seeds=[0]), model=model, echo=False).labels == chosen.labels
    )


def test_two_professions_with_test_time_ablation_and_variants(model, tmp_path, monkeypatch):
    cfg = small(
        task="gender2:doctor|nurse", seeds=[0, 1], learned_less_step=None, schedule="constant",
        test_time=True, variants=["mean", "steer-3"],
    )  # fmt: skip
    results = run_demo(tmp_path, cfg, model=model, echo=False)
    methods = {s["method"] for s in results["summary"]}
    assert methods == {
        "base", "plain", "plain+ablate-pca", "caft-pca", "caft-pca+hook", "caft-pca-mean",
        "caft-pca-steer-3", "random", "top",
    }  # fmt: skip
    assert all(s["n_seeds"] == 2 for s in results["summary"] if s["method"] != "base")
    run = json.loads((tmp_path / "runs" / "s1" / "caft-pca-mean" / "run.json").read_text())
    assert run["config"]["schedule"] == "constant" and "mean" in json.dumps(run["intervention"])
    # The test-time baseline is the plain model evaluated with the CAFT ablation on.
    concepts = ct.ConceptSet.load(tmp_path / "concepts" / "pca")
    plain = ct.load_model(tmp_path / "runs" / "s0" / "plain" / "final")
    data = {s: ct.tasks.gender_two_professions(s, n=8) for s in ("test", "ood")}
    hooked = ct.evals.evaluate_splits(plain, data, intervention=ct.Ablation(concepts))
    saved = json.loads((tmp_path / "evals" / "plain+ablate-pca" / "s0.json").read_text())
    assert saved == json.loads(json.dumps(hooked))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("caft_tl.compare.finetune", no_training)
    assert run_demo(tmp_path, cfg, model=model, echo=False)["evals"] == results["evals"]

    # More variants later: only the new runs train; the first seed may not change.
    monkeypatch.undo()
    trained = []
    real = ct.train.finetune
    monkeypatch.setattr(
        "caft_tl.compare.finetune", lambda *a, **k: trained.append(k["out"].name) or real(*a, **k)
    )
    more = dataclasses.replace(cfg, seeds=[0], variants=["mean", "steer-3", "detached"])
    again = run_demo(tmp_path, more, model=model, echo=False)
    assert trained == ["caft-pca-detached"] and "caft-pca-detached/s0" in again["evals"]
    with pytest.raises(ValueError, match="first seed"):
        run_demo(tmp_path, dataclasses.replace(cfg, seeds=[1, 0]), model=model, echo=False)


def test_conditions_train_only_the_named_runs_then_the_rest_joins(model, tmp_path, monkeypatch):
    cfg = small(seeds=[0], learned_less_step=None, variants=["mean"], conditions=["caft-pca-mean"])
    results = run_demo(tmp_path, cfg, model=model, echo=False)
    assert {s["method"] for s in results["summary"]} == {"base", "plain", "caft-pca-mean"}
    # The rest of the study later, in the same folder: only the missing runs train.
    trained = []
    real = ct.train.finetune
    monkeypatch.setattr(
        "caft_tl.compare.finetune", lambda *a, **k: trained.append(k["out"].name) or real(*a, **k)
    )
    full = run_demo(tmp_path, dataclasses.replace(cfg, conditions=None), model=model, echo=False)
    assert sorted(trained) == ["caft-pca", "random", "top"]
    assert full["evals"]["caft-pca-mean/s0"] == results["evals"]["caft-pca-mean/s0"]
    with pytest.raises(ValueError, match=r"caft-sae needs sae=True"):
        small(conditions=["caft-sae"])
    with pytest.raises(ValueError, match=r"\['caft-pca-steer-3'\]"):
        small(variants=["mean"], conditions=["caft-pca-steer-3"])


def test_task_names_are_checked():
    for task in ("gender2:doctor", "gender2:a|a", "double_mc:sentiment|sentiment",
                 "double_mc:sentiment|verbs:third", "gender_pronoun:x"):  # fmt: skip
        with pytest.raises(ValueError, match="task must be"):
            DemoConfig(task=task)
    assert DemoConfig(task="double_mc:pronouns|verbs:second").task.endswith("second")


def test_sae_latents_run_through_the_same_study(model, tmp_path):
    cfg = small(
        seeds=[0], learned_less_step=None, sae=True, sae_hook=HOOKS[1], sae_width=64, sae_k=4,
        sae_top=8, sae_tokens=4000, test_time=True,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_demo(tmp_path, cfg, model=model, echo=False)
    methods = {s["method"] for s in results["summary"]}
    assert {"caft-sae", "caft-sae+hook", "plain+ablate-sae"} <= methods
    assert results["directions"]["sae"]["n_selected"] >= 1
    chosen = ct.ConceptSet.load(tmp_path / "concepts" / "sae")
    assert chosen.hooks == [HOOKS[1]]
    # SAE decoder rows are not orthonormal: the demo orthonormalises them itself instead of
    # warning its user about directions they never passed.
    assert chosen.non_orthonormal_hooks() == [HOOKS[1]]
    assert not [w for w in caught if "not orthonormal" in str(w.message)]
