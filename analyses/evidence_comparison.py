#!/usr/bin/env python
"""The full comparison on the setting the evidence search chose (issue 22).

    python analyses/evidence_comparison.py [--seeds 0 1 2 3 4] [--sae] [--cached]

Reads the pre-registered pick from the search's table (``caft_tl.viz.search_table()``; or
``--task`` and ``--steps``) and runs the demo's study on it with the search's training
settings (lr 3e-5, constant after 5 warm-up steps, batch 8): plain; CAFT with the PCA
directions the hinted interpretation selects (never OOD accuracy), and with SAE latents
(``--sae``); random directions; top PCs; the plain run stopped half-way; the plain model
with the CAFT ablation at test time only; CAFT evaluated with its ablation removed and kept
on; mean-ablation and steering by -3 x the mean projection (``--variants``); with
``--crosscoder``, CAFT with the genuine fine-tune-only latents of the BatchTopK crosscoder
that ``crosscoder_study.py --task ...`` trained, selected by the demo's hinted rule
(pre-registration amendment 3; not run when no latent is genuine). Artefacts go to
``results/studies/evidence/`` (not committed; every run and evaluation is cached there, so
the script resumes), numbers to ``results/evidence_comparison.{json,md}``: per-seed
accuracies, means, 95% bootstrap intervals over seeds and paired differences against plain.
Every other qualifying setting of the search (e.g. the same task trained two epochs) runs
with ``--task`` and ``--steps`` into its own folder and
``results/evidence_comparison_<task>-<steps>steps.{json,md}``; the pick's table lists them.
``--cached`` tabulates the evaluations already on disk (also part-way through).
``--conditions`` trains only the named conditions besides plain, and ``--merge`` adds them to
the setting's earlier results file when the study folder was lost: the rerun's plain runs
(and every other evaluation both have) must reproduce the earlier counts and accuracies
exactly (margins to 1e-4 relative).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET = {"ood_gain": 0.30, "id_tolerance": 0.05}


def study_config(
    task: str, steps: int, seeds: list[int], sae: bool, variants: list[str], test_time: bool = True,
    conditions: list[str] | None = None,
):  # fmt: skip
    from caft_tl.demo import DemoConfig, parse_task  # noqa: F401 (validates the name)

    n = {"train": 286, "eval": 190} if task.startswith("gender2:") else {"train": 320, "eval": 200}
    return DemoConfig(
        task=task, seeds=seeds, n_train=n["train"], n_eval=n["eval"], max_steps=steps, lr=3e-5,
        warmup_steps=5, schedule="constant", learned_less_step=max(1, steps // 2),
        test_time=test_time, variants=variants, sae=sae, conditions=conditions,
    )  # fmt: skip


def chosen_setting() -> tuple[str, int] | None:
    """The search's pick as (demo task, steps), or None when nothing qualified."""
    from caft_tl.viz import search_table

    search = search_table()  # the search's table, as the package ships it
    if search is None or search["chosen"] is None:
        return None
    return demo_task(search["chosen"]["candidate"]), search["chosen"]["steps"]


def qualifying_settings() -> list[tuple[str, int]]:
    """Every (demo task, steps) the search found qualifying, the pick first."""
    from caft_tl.viz import search_table

    search = search_table() or {"settings": [], "chosen": None}
    rows = [r for r in search["settings"] if r["verdict"] == "qualifies"]
    rows.sort(key=lambda r: r != search["chosen"])
    return [(demo_task(r["candidate"]), r["steps"]) for r in rows]


def setting_paths(task: str, steps: int, pick: tuple[str, int] | None) -> tuple[Path, str]:
    """The study folder and the results' file stem of one setting. The search's pick keeps
    the plain names (``evidence/<task>``, ``evidence_comparison``); any other setting (e.g.
    the same task trained longer) gets its own folder and files, so caches never mix."""
    slug = task.replace(":", "-").replace("|", "-")
    if (task, steps) == pick:
        return RESULTS / "studies" / "evidence" / slug, "evidence_comparison"
    name = f"{slug}-{steps}steps"
    return RESULTS / "studies" / "evidence" / name, f"evidence_comparison_{name}"


def other_settings_lines(pick: tuple[str, int] | None) -> str:
    """Which other qualifying settings have a comparison file, for the pick's markdown."""
    lines = []
    for task, steps in qualifying_settings():
        if (task, steps) == pick:
            continue
        stem = setting_paths(task, steps, pick)[1]
        done = (RESULTS / f"{stem}.md").exists()
        where = f"`results/{stem}.md`" if done else "not run yet (`--task ... --steps ...`)"
        lines.append(f"- `{task}`, {steps} steps: {where}")
    if not lines:
        return ""
    return "\nOther qualifying settings of the search:\n\n" + "\n".join(lines) + "\n"


def demo_task(candidate: str) -> str:
    """The search's candidate name as a demo task name."""
    kind, _, rest = candidate.partition(":")
    return f"double_mc:{rest}" if kind == "dmc" else candidate


def crosscoder_condition(folder: Path, task: str, cfg, seeds: list[int]) -> dict[str, Any]:
    """``caft-crosscoder`` runs (amendment 3), or why there are none."""
    from crosscoder_study import crosscoder_folder

    from caft_tl.directions import CrosscoderDiff, load_crosscoder

    run = crosscoder_folder(task, "blocks.12.hook_resid_post") / "batchtopk"
    if not (run / "diff").exists():
        raise SystemExit(f"no crosscoder in {run}: run analyses/crosscoder_study.py --task "
                         f"'{task}' first")  # fmt: skip
    cc, diff = load_crosscoder(run), CrosscoderDiff.load(run / "diff")
    record: dict[str, Any] = {"summary": diff.summary().to_dict("records")}
    if diff.genuine().empty:
        return {**record, "status": "not run: no genuine fine-tune-only latent"}
    from caft_tl.demo import demo_study, select_by_hints, task_data
    from caft_tl.interventions import Ablation
    from caft_tl.models import load_model
    from caft_tl.study import StudyLog

    plain0 = load_model(folder / "runs" / "s0" / "plain" / "final", device="cpu")
    chosen, scores, fallback = select_by_hints(
        plain0, diff.concepts(cc), cfg, folder / "concepts" / "crosscoder"
    )
    del plain0
    study = demo_study(folder, cfg, load_model(device="cpu"), task_data(cfg), StudyLog(print))
    ablation = Ablation(chosen.orthonormalised(), mode="zero")
    for seed in seeds:
        study.intervened("caft-crosscoder", seed, ablation)
    return {
        **record, "status": "run", "selected": chosen.labels, "fallback": fallback,
        "scores": scores.to_dict("records"),
    }  # fmt: skip


def read_evals(folder: Path) -> dict[str, Any]:
    """Every cached evaluation of a study folder, ``{"method/seed": {split: {...}}}``."""
    evals = {}
    for path in sorted((folder / "evals").rglob("*.json")):
        name = path.relative_to(folder / "evals").with_suffix("").as_posix()
        evals[name] = json.loads(path.read_text())
    return evals


def selection_record(folder: Path) -> dict[str, Any] | None:
    """Which directions the demo's rule selected on seed 0 (from the study's results.json),
    so a results file says what CAFT ablated even after the study folder is gone."""
    from caft_tl._io import read_json  # names the file when it is corrupt

    path = folder / "results.json"
    if not path.exists():
        return None
    directions = read_json(path, "demo results").get("directions", {})
    keep = ("selected", "n_selected", "fallback")
    return {name: {k: d[k] for k in keep if k in d} for name, d in directions.items()}


def selection_lines(selection: dict[str, Any] | None) -> str:
    if not selection:
        return ""
    lines = ["", "Directions the rule selected (seed 0's plain fine-tune):", ""]
    for name, d in selection.items():
        where = "; ".join(f"`{h}` {', '.join(map(str, v))}" for h, v in d["selected"].items())
        note = " (fallback: none beat the random null)" if d.get("fallback") else ""
        lines.append(f"- {name}: {d['n_selected']}{note}: {where or 'none'}")
    return "\n".join(lines) + "\n"


EXACT = ("accuracy", "vocab_accuracy", "n", "n_correct")


def same_evaluation(new: dict[str, Any], old: dict[str, Any], rel: float = 1e-4) -> bool:
    """One evaluation reproduced: the same splits, counts and accuracies exactly, and the
    continuous diagnostics (mean margin, option mass) to ``rel``. Those move in the 6th
    digit between code versions (a different but equivalent matmul order in the fast
    paths); a changed answer changes a count."""
    if set(new) != set(old):
        return False
    for split, values in new.items():
        if set(values) != set(old[split]):
            return False
        for key, value in values.items():
            other = old[split][key]
            exact = key in EXACT or not isinstance(value, float)
            if value != other if exact else not math.isclose(value, other, rel_tol=rel):
                return False
    return True


def merge_previous(
    evals: dict[str, Any], selection: dict[str, Any] | None, previous: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """Add the evaluations of an earlier results file (``previous``) that this study folder
    lacks, e.g. when the folder was lost and only new conditions were rerun. Valid only if
    the rerun reproduces the earlier runs: every evaluation found in both must be the same
    (:func:`same_evaluation`) and every selected direction identical, else the script
    stops. Returns the merged evaluations and
    selection, and the names taken from ``previous``."""
    common = set(evals) & set(previous["evals"])
    if not any(key.startswith("plain/") for key in common):
        raise SystemExit("--merge: the rerun has no plain evaluation to check against the earlier")
    for key in sorted(common):
        if not same_evaluation(evals[key], previous["evals"][key]):
            raise SystemExit(
                f"--merge: the rerun's {key} differs from the earlier results file's: the "
                "runs are not the same, so their numbers cannot share one table"
            )
    old = previous.get("directions") or {}
    for name in sorted(set(selection or {}) & set(old)):
        if selection[name] != old[name]:
            raise SystemExit(f"--merge: the rerun selected other {name} directions")
    kept = sorted(set(previous["evals"]) - set(evals))
    merged = {**old, **(selection or {})} or None
    return {**previous["evals"], **evals}, merged, kept


def tables(evals: dict[str, Any]) -> dict[str, Any]:
    from caft_tl.evals import seed_comparison

    out = {}
    for split in ("test", "ood"):
        df = seed_comparison(evals, baseline="plain", split=split)
        out[split] = json.loads(df.to_json(orient="records"))
    return out


def verdicts(comparison: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target for each CAFT condition (OOD gain, ID kept, interval above 0)."""
    test = {r["method"]: r for r in comparison["test"]}
    rows = []
    for r in comparison["ood"]:
        # Deployed CAFT models only: "+hook" rows keep the ablation on at evaluation.
        if not r["method"].startswith("caft-") or "+" in r["method"] or r["method"] not in test:
            continue
        id_diff = test[r["method"]]["diff_mean"]
        low = r["diff_ci"][0]
        rows.append({
            "method": r["method"], "n_seeds": len(r["diffs"]), "ood_gain": r["diff_mean"],
            "ood_gain_ci": r["diff_ci"], "id_change": id_diff,
            "meets_target": bool(
                len(r["diffs"]) >= 5 and r["diff_mean"] >= TARGET["ood_gain"]
                and abs(id_diff) <= TARGET["id_tolerance"] and low is not None and low > 0
            ),
        })  # fmt: skip
    return rows


def markdown(task: str, steps: int, comparison: dict[str, Any], verdict: list[dict]) -> str:
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"  # noqa: E731
    ci = lambda c: f"[{fmt(c[0])}, {fmt(c[1])}]"  # noqa: E731
    test = {r["method"]: r for r in comparison["test"]}
    lines = [
        f"# Evidence comparison on `{task}` ({steps} steps), embedded model (issue 22)",
        "",
        "Accuracy per seed (seed order), mean with a 95% bootstrap interval over seeds, and the "
        "paired difference against plain (same seeds). Every model is evaluated without any "
        "intervention except `plain+ablate-*` (plain model, CAFT's ablation at test time only) "
        "and `*+hook` (the CAFT model with its ablation kept on).",
        "",
        "| method | ID mean | OOD per seed | OOD mean [95% CI] | OOD - plain [95% CI] "
        "| ID - plain |",
        "|---|---:|---|---|---|---:|",
    ]
    for r in comparison["ood"]:
        t = test.get(r["method"], {})
        per = " / ".join(fmt(v) for v in r["values"])
        lines.append(
            f"| {r['method']} | {fmt(t.get('mean'))} | {per} | {fmt(r['mean'])} {ci(r['ci'])} | "
            f"{fmt(r['diff_mean'])} {ci(r['diff_ci'])} | {fmt(t.get('diff_mean'))} |"
        )
    lines += ["", "Target (fixed before any CAFT run): OOD gain >= 0.30 over plain, ID within "
              "0.05, the paired interval above 0, over 5 seeds.", ""]  # fmt: skip
    for v in verdict:
        lines.append(
            f"- `{v['method']}` ({v['n_seeds']} seeds): OOD {fmt(v['ood_gain'])} "
            f"{ci(v['ood_gain_ci'])}, ID {fmt(v['id_change'])}: "
            f"**{'meets' if v['meets_target'] else 'does not meet'} the target**"
        )
    return "\n".join(lines) + "\n"


def merged_lines(merged: dict[str, Any]) -> str:
    return (
        f"\n{len(merged['evals'])} evaluations come from an earlier run of this setting (its "
        "study folder was lost); the rerun reproduced every evaluation the two have in common: "
        "the same counts and accuracies, margins to 1e-4 relative (checked by `--merge`).\n"
    )


def crosscoder_lines(record: dict[str, Any]) -> str:
    """The crosscoder condition's status and latent classes, for the markdown."""
    classes = ", ".join(f"{r['class']} {r['latents']}" for r in record["summary"])
    lines = ["", f"Crosscoder condition (BatchTopK, block 12): **{record['status']}** "
             f"(latents: {classes})."]  # fmt: skip
    if record["status"] == "run":
        note = " (fallback: none beat the random directions)" if record["fallback"] else ""
        lines.append(f"Selected: {record['selected']}{note}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", help="demo task name (default: the search's pick)")
    parser.add_argument("--steps", type=int, help="training steps (default: the search's pick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--sae", action="store_true", help="also CAFT with SAE latents")
    parser.add_argument("--variants", nargs="*", default=["mean", "steer-3"])
    parser.add_argument(
        "--crosscoder", action="store_true",
        help="also CAFT with genuine crosscoder latents (crosscoder_study.py --task first)",
    )  # fmt: skip
    parser.add_argument(
        "--conditions", nargs="+", default=None,
        help="train only these conditions besides plain (e.g. caft-pca-mean caft-pca-steer-3)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", action="store_true",
        help="keep the results file's evaluations this folder lacks (a rerun must reproduce "
        "every evaluation both have, else the script stops)",
    )  # fmt: skip
    parser.add_argument("--cached", action="store_true", help="tabulate what is on disk")
    parser.add_argument(
        "--no-test-time", action="store_true",
        help="skip the test-time-only and hook-on evaluations in this run (cached ones stay)",
    )  # fmt: skip
    args = parser.parse_args()
    pick = chosen_setting()
    if args.task is None or args.steps is None:
        if pick is None:
            raise SystemExit("the evidence search chose no setting: pass --task and --steps")
        args.task, args.steps = args.task or pick[0], args.steps or pick[1]
    folder, stem = setting_paths(args.task, args.steps, pick)
    if args.crosscoder and (args.task, args.steps) != pick:
        raise SystemExit("--crosscoder: amendment 3 fixes the crosscoder on the search's pick "
                         f"{pick} only")  # fmt: skip
    cfg = study_config(
        args.task, args.steps, args.seeds, args.sae, args.variants, not args.no_test_time,
        args.conditions,
    )  # fmt: skip
    if not args.cached or args.crosscoder:  # something trains
        import torch

        torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.cached:
        from caft_tl.demo import run_demo

        run_demo(folder, cfg)
    record = folder / "crosscoder_condition.json"  # kept for later --cached tables
    if args.crosscoder:
        record.write_text(
            json.dumps(
                crosscoder_condition(folder, args.task, cfg, args.seeds), indent=2, default=str
            )
        )
    crosscoder = json.loads(record.read_text()) if record.exists() else None
    evals, selection, merged = read_evals(folder), selection_record(folder), None
    if args.merge:
        from caft_tl._io import read_json

        previous = read_json(RESULTS / f"{stem}.json", "earlier evidence comparison")
        evals, selection, kept = merge_previous(evals, selection, previous)
        merged = {"config": previous["config"], "evals": kept}
    comparison = tables(evals)
    verdict = verdicts(comparison)
    config = json.loads((folder / "config.json").read_text())
    out = {"task": args.task, "steps": args.steps, "config": config, "target": TARGET,
           "evals": evals, "comparison": comparison, "verdicts": verdict,
           "crosscoder": crosscoder, "directions": selection, "merged_from": merged}  # fmt: skip
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(args.task, args.steps, comparison, verdict) + selection_lines(selection)
    if merged is not None:
        text += merged_lines(merged)
    if crosscoder is not None:
        text += crosscoder_lines(crosscoder)
    if (args.task, args.steps) == pick:
        text += other_settings_lines(pick)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
