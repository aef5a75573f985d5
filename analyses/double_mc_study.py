#!/usr/bin/env python
"""Double multiple-choice study: OOD accuracy per sub-task pair and method.

    python analyses/double_mc_study.py [--pairs sentiment|verbs pronouns|continents ...]
                                       [--seeds 0 1 2] [--steps 30] [--sae]

Each pair "INTENDED|DISTRACTOR" runs the study of ``caft-tl demo`` on that pair (hints: the
distractor's contrast sets). Default: every ordered pair (12; about 4 minutes per
fine-tune-and-evaluate on 2 CPU cores, so the full grid takes hours: pass a few pairs and
one seed for a first look). Prints the reference's table (OOD accuracy, rows = pairs,
columns = methods, mean over seeds) and writes results/double_mc_study.{md,json}.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from _study import add_arguments, run, save

import caft_tl as ct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=None, help="INTENDED|DISTRACTOR ...")
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pairs = args.pairs or ["|".join(p) for p in ct.tasks.double_mc_pairs()]
    model = ct.load_model(device="cpu")
    rows, ranges = {}, {}
    for pair in pairs:
        results = run(f"double_mc:{pair}", args, model)
        df = pd.DataFrame(results["summary"])
        ood = df[df["split"] == "ood"].set_index("method")
        rows[pair] = ood["mean"]
        ranges[pair] = ood[["min", "max"]].to_dict(orient="index")
    table = pd.DataFrame(rows).T
    table.loc["mean"] = table.mean()
    print("\nOOD accuracy (mean over seeds), rows = intended|distractor:")
    print(table.round(2).to_string())
    save("double_mc_study", table.round(3), {}, {"ood_mean": table.to_dict(), "ranges": ranges,
         "seeds": args.seeds, "steps": args.steps})  # fmt: skip


if __name__ == "__main__":
    main()
