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

import torch
from _study import RESULTS, markdown, save

import caft_tl as ct
from caft_tl._io import read_json
from caft_tl.demo import DemoConfig, _data, _train_config
from caft_tl.diagnostics import decomposition_figure, decomposition_table, training_decomposition

STUDY = RESULTS / "studies" / "gender_pronoun"
REUSED = {"plain": "plain", "zero": "caft-pca"}  # our condition -> the demo's run name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the study's")
    parser.add_argument("--ks", type=float, nargs="+", default=[3.0, 5.0])
    parser.add_argument("--conditions", nargs="+", default=None, help="default: all, by --ks")
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
    data = _data(cfg)
    base = ct.load_model(device="cpu")
    results = training_decomposition(
        base, data["train"], concepts, {"test": data["test"], "ood": data["ood"]},
        _train_config(cfg, seeds[0]), out, seeds=seeds, ks=args.ks, conditions=args.conditions,
    )  # fmt: skip
    table = decomposition_table(results)
    print(f"\nConcepts: {concepts.labels}")
    print(markdown(table))
    fig = decomposition_figure(results, title="Gender task: which half of CAFT does the work?")
    save("decomposition_study", table, {"accuracy": fig}, {
        "concepts": concepts.labels, "seeds": seeds, "ks": args.ks,
        "reused_from_gender_study": REUSED, "rows": results.to_dict("records"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
