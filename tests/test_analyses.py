"""The evidence scripts in analyses/: the pre-registered rules and their command lines."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ANALYSES))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ANALYSES))
    return module


def run(candidate: str, seed: int, per_epoch: list[tuple[float, float]], n: int = 190) -> dict:
    rows = [
        {
            "epoch": e,
            "step": 36 * e,
            "test": {"accuracy": i, "n": n},
            "ood": {"accuracy": o, "n": n},
        }
        for e, (i, o) in enumerate(per_epoch, start=1)
    ]
    return {"candidate": candidate, "seed": seed, "epochs": rows}


def test_search_criterion_and_pick_rule():
    search = load("evidence_search")
    runs = [
        run("a", 0, [(0.95, 0.20), (1.0, 0.10)]),
        run("a", 1, [(0.95, 0.40), (1.0, 0.10)]),
        run("a", 2, [(0.95, 0.25), (1.0, 0.10)]),  # epoch 1 mean OOD 0.283: qualifies
        run("b", 0, [(0.85, 0.00)]),  # ID too low
        run("b", 1, [(0.85, 0.00)]),
        run("b", 2, [(0.85, 0.00)]),
        run("c", 0, [(1.0, 0.0)]),  # one seed only: incomplete
        run("d", 0, [(1.0, 0.0)], n=100),
        run("d", 1, [(1.0, 0.0)], n=100),
        run("d", 2, [(1.0, 0.0)], n=100),  # too few examples
    ]
    table = {(r["candidate"], r["epochs"]): r for r in search.settings_table(runs)}
    assert table[("a", 1)]["verdict"] == "qualifies"
    assert table[("a", 1)]["ood"] == [0.20, 0.40, 0.25]
    assert table[("a", 2)]["verdict"] == "qualifies"
    assert table[("b", 1)]["verdict"] == "fails"
    assert table[("c", 1)]["verdict"] == "incomplete"
    assert table[("d", 1)]["verdict"] == "fails"
    pick = search.chosen_setting(list(table.values()))
    assert (pick["candidate"], pick["epochs"]) == ("a", 1)  # fewest steps first
    assert search.chosen_setting([table[("b", 1)]]) is None
    assert search.screened_out([run("e", 0, [(1.0, 0.7), (1.0, 0.65)])], "e")
    assert not search.screened_out([run("e", 0, [(1.0, 0.7), (1.0, 0.5)])], "e")
    screened = search.settings_table([run("e", 0, [(1.0, 0.7), (1.0, 0.65)])])
    assert all(r["verdict"].startswith("screened out") for r in screened)
    assert all("after each of its 2 epochs" in r["verdict"] for r in screened)
    assert "gender2:doctor|nurse" in search.not_run(runs)
    assert len(search.all_candidates()) == 25  # gender2 and 12 ordered pairs x 2 positions
    md = search.markdown(list(table.values()), pick, ["dmc:verbs|sentiment:first"])
    assert "| a | 1 | 36 |" in md and "**a, 1 epochs**" in md
    assert "Not run" in md and "`dmc:verbs|sentiment:first`" in md


def test_comparison_verdict_needs_the_gain_the_interval_and_the_id():
    comparison = load("evidence_comparison")
    evals = {}
    for seed in range(5):
        evals[f"plain/s{seed}"] = {"test": {"accuracy": 1.0}, "ood": {"accuracy": 0.05}}
        evals[f"caft-pca/s{seed}"] = {"test": {"accuracy": 0.98}, "ood": {"accuracy": 0.5}}
        evals[f"caft-sae/s{seed}"] = {"test": {"accuracy": 0.8}, "ood": {"accuracy": 0.6}}
        evals[f"random/s{seed}"] = {"test": {"accuracy": 1.0}, "ood": {"accuracy": 0.9}}
    verdicts = {v["method"]: v for v in comparison.verdicts(comparison.tables(evals))}
    assert verdicts["caft-pca"]["meets_target"] and verdicts["caft-pca"]["n_seeds"] == 5
    assert not verdicts["caft-sae"]["meets_target"]  # ID fell by 0.2
    assert "random" not in verdicts  # controls are not CAFT
    four = {k: v for k, v in evals.items() if not k.endswith("s4")}
    assert not comparison.verdicts(comparison.tables(four))[0]["meets_target"]  # 4 seeds


def test_every_qualifying_setting_gets_its_own_folder_and_table(monkeypatch, tmp_path):
    import caft_tl.viz

    comparison = load("evidence_comparison")
    rows = [
        {"candidate": "gender2:doctor|nurse", "steps": 36, "verdict": "qualifies"},
        {"candidate": "gender2:doctor|nurse", "steps": 72, "verdict": "qualifies"},
        {"candidate": "dmc:pronouns|verbs:first", "steps": 40, "verdict": "screened out (...)"},
    ]
    table = {"settings": rows, "chosen": rows[0]}
    monkeypatch.setattr(caft_tl.viz, "search_table", lambda: table)
    monkeypatch.setattr(comparison, "RESULTS", tmp_path)
    pick = comparison.chosen_setting()
    assert pick == ("gender2:doctor|nurse", 36)
    assert comparison.qualifying_settings() == [pick, ("gender2:doctor|nurse", 72)]
    # The pick keeps the names its cached runs already have; another length never shares them.
    assert comparison.setting_paths(*pick, pick) == (
        tmp_path / "studies" / "evidence" / "gender2-doctor-nurse",
        "evidence_comparison",
    )
    folder, stem = comparison.setting_paths("gender2:doctor|nurse", 72, pick)
    assert folder.name == "gender2-doctor-nurse-72steps"
    assert stem == "evidence_comparison_gender2-doctor-nurse-72steps"
    assert "72 steps: not run yet" in comparison.other_settings_lines(pick)
    (tmp_path / f"{stem}.md").write_text("# done\n")
    assert f"`results/{stem}.md`" in comparison.other_settings_lines(pick)
    table["chosen"] = None
    assert comparison.chosen_setting() is None


def test_merge_keeps_earlier_numbers_only_when_the_rerun_reproduces_them():
    comparison = load("evidence_comparison")
    acc = lambda a: {"test": {"accuracy": a, "n": 190}, "ood": {"accuracy": a, "n": 190}}  # noqa: E731
    previous = {
        "evals": {"plain/s0": acc(0.5), "caft-sae/s0": acc(0.7)},
        "directions": {"pca": {"n_selected": 4}, "sae": {"n_selected": 2}},
    }
    rerun = {"plain/s0": acc(0.5), "caft-pca-mean/s0": acc(0.6)}
    evals, selection, kept = comparison.merge_previous(rerun, {"pca": {"n_selected": 4}}, previous)
    assert evals == {**previous["evals"], **rerun} and kept == ["caft-sae/s0"]
    assert selection == previous["directions"]
    with pytest.raises(SystemExit, match="plain/s0 differs"):
        comparison.merge_previous({**rerun, "plain/s0": acc(0.51)}, None, previous)
    # Continuous diagnostics may move in the 6th digit; counts and accuracies may not.
    margin = lambda m: {s: {"accuracy": 0.5, "n": 190, "mean_margin": m} for s in ("test", "ood")}  # noqa: E731
    assert comparison.same_evaluation(margin(25.06741), margin(25.06734))
    assert not comparison.same_evaluation(margin(25.07), margin(25.06))
    assert not comparison.same_evaluation(margin(1.0), {"test": margin(1.0)["test"]})
    with pytest.raises(SystemExit, match="other pca directions"):
        comparison.merge_previous(rerun, {"pca": {"n_selected": 3}}, previous)
    with pytest.raises(SystemExit, match="no plain evaluation"):
        comparison.merge_previous({"caft-pca-mean/s0": acc(0.6)}, None, previous)


SCRIPTS = sorted(
    p.relative_to(ANALYSES).as_posix()
    for p in [*ANALYSES.glob("*.py"), *ANALYSES.glob("benchmarks/*.py")]
    if not p.name.startswith("_")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_study_and_benchmark_script_answers_help(script, monkeypatch, capsys):
    # In this process, as `python SCRIPT --help` runs it (its folder first on sys.path): the
    # libraries are imported once for all scripts instead of once per subprocess.
    path = ANALYSES / script
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.syspath_prepend(str(path.parent))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(path), run_name="__main__")
    assert done.value.code == 0 and "usage" in capsys.readouterr().out


def test_hook_on_rows_are_not_judged_against_the_target():
    comparison = load("evidence_comparison")
    evals = {}
    for seed in range(5):
        evals[f"plain/s{seed}"] = {"test": {"accuracy": 1.0}, "ood": {"accuracy": 0.0}}
        evals[f"caft-pca+hook/s{seed}"] = {"test": {"accuracy": 1.0}, "ood": {"accuracy": 0.9}}
    assert comparison.verdicts(comparison.tables(evals)) == []


@pytest.mark.slow
def test_the_cheapest_benchmark_runs_its_quick_mode(tmp_path):
    # bench_pca --quick (about a minute on 2 cores) exercises the shared benchmark helpers
    # end to end: child processes, memory probes, the JSON record and the Markdown table.
    import subprocess

    out = tmp_path / "pca_quick.json"
    script = ANALYSES / "benchmarks" / "bench_pca.py"
    subprocess.run([sys.executable, str(script), "--quick", "--output", str(out)], check=True)
    result = json.loads(out.read_text())
    assert result["mode"] == "quick" and len(result["runs"]) == 2
    assert all(run["ours"]["tokens_per_s"] > 0 for run in result["runs"])
    assert result["memory_growth"]["ours"] > 0
    assert result["markdown_table"].startswith("|")


def test_results_file_records_the_selected_directions(tmp_path):
    comparison = load("evidence_comparison")
    assert comparison.selection_record(tmp_path) is None and comparison.selection_lines(None) == ""
    directions = {
        "pca": {"selected": {"blocks.6.hook_resid_post": ["PC10", "PC17"]}, "n_selected": 2,
                "fallback": False, "scores": [{"auroc": 0.9}]},
        "sae": {"selected": {"blocks.12.hook_resid_post": ["latent 371"]}, "n_selected": 1,
                "fallback": True, "scores": []},
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps({"directions": directions}))
    record = comparison.selection_record(tmp_path)
    assert "scores" not in record["pca"] and record["sae"]["fallback"] is True
    text = comparison.selection_lines(record)
    assert "- pca: 2: `blocks.6.hook_resid_post` PC10, PC17" in text
    assert "- sae: 1 (fallback: none beat the random null): " in text
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="demo results: .*results.json is corrupt"):
        comparison.selection_record(tmp_path)


def test_crosscoder_condition_lines_say_why_it_did_not_run():
    comparison = load("evidence_comparison")
    summary = [{"class": "shared", "latents": 2000}, {"class": "finetuned-only", "latents": 0}]
    text = comparison.crosscoder_lines(
        {"summary": summary, "status": "not run: no genuine fine-tune-only latent"}
    )
    assert "**not run: no genuine fine-tune-only latent**" in text
    assert "shared 2000, finetuned-only 0" in text
    ran = {"summary": summary, "status": "run", "selected": {"h": ["latent 7"]}, "fallback": True}
    assert "fallback" in comparison.crosscoder_lines(ran)


def test_crosscoder_condition_runs_selected_genuine_latents_on_every_seed(monkeypatch, tmp_path):
    # The wiring of the branch that runs (no real crosscoder has had a genuine latent yet):
    # the demo's rule selects among the genuine latents' directions and every seed trains
    # with their zero-ablation under the study's cache.
    import pandas as pd
    import torch

    import caft_tl.demo
    import caft_tl.models

    comparison = load("evidence_comparison")
    monkeypatch.syspath_prepend(str(ANALYSES))
    import crosscoder_study

    import caft_tl as ct
    import caft_tl.directions as directions

    run = tmp_path / "cc" / "batchtopk"
    (run / "diff").mkdir(parents=True)
    concepts = ct.ConceptSet({"blocks.0.hook_resid_post": torch.eye(4)[:2]})

    class Diff:
        def summary(self):
            return pd.DataFrame([{"class": "finetuned-only", "latents": 2}])

        def genuine(self):
            return pd.DataFrame({"latent": [3, 5]})

        def concepts(self, cc):
            return concepts

    monkeypatch.setattr(crosscoder_study, "crosscoder_folder", lambda task, hook: run.parent)
    monkeypatch.setattr(directions, "load_crosscoder", lambda path: "cc")
    monkeypatch.setattr(directions.CrosscoderDiff, "load", staticmethod(lambda path: Diff()))
    monkeypatch.setattr(caft_tl.models, "load_model", lambda *a, **k: "model")
    monkeypatch.setattr(
        caft_tl.demo, "task_data", lambda cfg: dict.fromkeys(("train", "test", "ood"))
    )
    picked = concepts.select({"blocks.0.hook_resid_post": [1]})
    monkeypatch.setattr(caft_tl.demo, "select_by_hints", lambda *a: (picked, pd.DataFrame(), False))
    calls = []

    class FakeStudy:
        def __init__(self, *args, **kwargs):
            pass

        def intervened(self, name, seed, intervention):
            calls.append((name, seed, intervention.concepts.n_directions))

    monkeypatch.setattr(caft_tl.demo, "Study", FakeStudy)
    task = "gender2:doctor|nurse"
    cfg = comparison.study_config(task, 36, [0, 1, 2], sae=False, variants=[])
    record = comparison.crosscoder_condition(tmp_path, task, cfg, [0, 1, 2])
    assert record["status"] == "run" and record["fallback"] is False
    assert calls == [("caft-crosscoder", s, 1) for s in (0, 1, 2)]


def test_paired_ratio_interval_brackets_the_median_and_narrows_with_rounds(monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSES / "benchmarks"))
    bench = load("benchmarks/bench_train")

    def times(ratios):
        walls = {"a": [r * 2.0 for r in ratios], "b": [2.0] * len(ratios)}
        return {n: {"wall": w, "cpu": w, "fwd_bwd": w} for n, w in walls.items()}

    few = bench.paired_ratio(times([0.9, 1.0, 1.1, 1.2, 1.05]), "a", "b")
    low, high = few["wall_median_ci95"]
    assert few["wall_median"] == pytest.approx(1.05)
    assert low <= few["wall_median"] <= high and low < high
    many = bench.paired_ratio(times([0.9, 1.0, 1.1, 1.2, 1.05] * 8), "a", "b")
    assert many["wall_median_ci95"][1] - many["wall_median_ci95"][0] < high - low
    assert bench.paired_ratio(times([1.0] * 6), "a", "b")["wall_median_ci95"] == [1.0, 1.0]


def test_step_profile_splits_self_time_by_step_phase_and_kind(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ANALYSES / "benchmarks"))
    bench = load("benchmarks/bench_train")
    w = torch.nn.Parameter(torch.randn(16, 16))
    optimizer = torch.optim.AdamW([w], lr=1e-3)

    def step(rows):
        def run():
            optimizer.zero_grad(set_to_none=True)
            (torch.randn(rows, 16) @ w).relu().sum().backward()
            optimizer.step()

        return run

    prof = bench.profile_self_ms({"small": step(4), "large": step(64)}, reps=2)
    assert set(prof) == {"small", "large"}
    for name, rows in (("small", 4), ("large", 64)):
        rec = prof[name]
        assert set(rec["phases"]) == {"forward", "backward", "optimizer"}
        assert all(ms > 0 for ms in rec["phases"].values())
        assert rec["kinds"]["products"] > 0 and rec["kinds"]["attention"] == 0
        shapes = [k for k in rec["ops"] if k.startswith("aten::mm [[")]
        assert f"aten::mm [[{rows}, 16], [16, 16]]" in shapes  # each step's own ops only
        assert f"aten::mm [[{68 - rows}, 16], [16, 16]]" not in shapes
        mm = sum(ms for k, ms in rec["ops"].items() if k.startswith("aten::mm "))
        assert abs(rec["by_name"]["aten::mm"] - mm) < 1e-9
        assert abs(sum(rec["phases"].values()) - rec["total"]) < 1e-9
        assert abs(sum(rec["kinds"].values()) - rec["total"]) < 1e-6


def test_loss_path_rows_read_full_and_target_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ANALYSES / "benchmarks"))
    bench = load("benchmarks/bench_train")
    ratio = {"wall_median": 0.99, "wall_median_ci95": [0.97, 1.01], "cpu_median": 0.98}
    ratio["of_minima"] = 0.96

    def result(paths):
        ratios = {
            name: dict(ratio)
            for name, (num, den) in bench.RATIOS.items()
            if num in paths and den in paths
        }
        walls = {f"{p}_unpadded_{iv}": 4.0 for p in paths for iv in ("none", "zero")}
        return {"loss_paths": {"ratios": {"unpadded_zero": ratios}, "wall_s_median": walls}}

    full = bench.markdown_table(result(tuple(bench.LOSS_PATHS)))
    target = bench.markdown_table(result(bench.TARGET_PATHS))
    for table in (full, target):
        assert "unpadded batch, zero-ablation" in table
        assert "ours / HF `labels=` = 0.99x (95% interval 0.97-1.01" in table
    assert 'TL `return_type="loss"`' in full and "TL" not in target
