#!/usr/bin/env python
"""Training decomposition on the gender task with the demo's ConceptSet.

    python analyses/decomposition_study.py [--seeds 0 1 2] [--ks 3 5]

The same fine-tune (the gender study's data, config and seeds) with no intervention,
zero-ablation (CAFT), its activation-only (detached) and gradient-only halves, and steering by
±k x the base model's mean projection on the directions the demo selected. Needs the gender
study's artefacts (``python analyses/gender_study.py`` first); its plain and CAFT runs are
the same runs as this study's ``plain`` and ``zero`` and are reused, not trained again.
Writes results/decomposition_study.{md,json} and a figure; runs are cached under
results/studies/gender_pronoun/decomposition/.
"""

from __future__ import annotations

import argparse
import shutil

import pandas as pd
import torch
from _study import RESULTS, markdown, save

import caft_tl as ct
from caft_tl._io import read_json
from caft_tl.demo import DemoConfig, task_data, train_config
from caft_tl.diagnostics import (
    condition_names,
    decomposition_figure,
    decomposition_table,
    training_decomposition,
)

STUDY = RESULTS / "studies" / "gender_pronoun"
REUSED = {"plain": "plain", "zero": "caft-pca"}  # our condition -> the demo's run name


def _cached(out, names: list[str], seeds: list[int]) -> pd.DataFrame:
    """The finished runs' evaluations (training_decomposition's cache), whatever is done."""
    rows = []
    for name in names:
        for seed in seeds:
            path = out / "evals" / name / f"s{seed}.json"
            if path.exists():
                evals = read_json(path, "decomposition result")
                rows += [
                    {"condition": name, "seed": seed, "split": k, **v} for k, v in evals.items()
                ]
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the study's")
    parser.add_argument("--ks", type=float, nargs="+", default=[3.0, 5.0])
    parser.add_argument("--conditions", nargs="+", default=None, help="default: all, by --ks")
    parser.add_argument(
        "--cached", action="store_true", help="tabulate the runs already done; train nothing"
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not (STUDY / "concepts" / "pca").exists():
        raise SystemExit(f"no gender study in {STUDY}: run analyses/gender_study.py first")
    cfg = DemoConfig.from_dict(read_json(STUDY / "config.json", "gender study configuration"))
    seeds = args.seeds or cfg.seeds
    concepts = ct.ConceptSet.load(STUDY / "concepts" / "pca")
    out = STUDY / "decomposition"
    for ours, theirs in REUSED.items():
        for seed in seeds:
            source = STUDY / "evals" / theirs / f"s{seed}.json"
            target = out / "evals" / ours / f"s{seed}.json"
            if source.exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    names = args.conditions or condition_names(args.ks)
    if args.cached:
        results = _cached(out, names, seeds)
    else:
        data = task_data(cfg)
        results = training_decomposition(
            ct.load_model(device="cpu"), data["train"], concepts,
            {"test": data["test"], "ood": data["ood"]}, train_config(cfg, seeds[0]), out,
            seeds=seeds, conditions=names,
        )  # fmt: skip
    table = decomposition_table(results)
    print(f"\nConcepts: {concepts.labels}")
    print(markdown(table))
    fig = decomposition_figure(results, title="Gender task: which half of CAFT does the work?")
    save("decomposition_study", table, {"accuracy": fig}, {
        "concepts": concepts.labels, "seeds": seeds, "ks": args.ks,
        "reused_from_gender_study": REUSED, "rows": results.to_dict("records"),
        "seeds_per_condition": results.groupby("condition")["seed"].unique().map(list).to_dict(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
