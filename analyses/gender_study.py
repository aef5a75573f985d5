#!/usr/bin/env python
"""Gender-pronoun study: OOD accuracy of plain fine-tuning, CAFT and the controls.

    python analyses/gender_study.py [--seeds 0 1 2] [--steps 30] [--sae]

Runs the study of ``caft-tl demo`` (artefacts in analyses/results/studies/, reused by a
second run) and prints the reference's table: OOD (and ID) accuracy per method, mean and
range over seeds. Writes results/gender_study.{md,json} and an accuracy figure.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from _study import add_arguments, ood_table, run, save

import caft_tl as ct
from caft_tl.demo import summary_table
from caft_tl.viz import accuracy_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = run("gender_pronoun", args, ct.load_model(device="cpu"))
    table = summary_table(results)
    print("\nOOD accuracy per method (mean [min, max] over seeds):")
    print(ood_table(results).to_string())
    print("\nID (test) and OOD:")
    print(table.to_string())
    save("gender_study", pd.DataFrame(table), {"accuracy": accuracy_figure(results)},
         {"summary": results["summary"], "directions": {k: {"selected": v["selected"],
          "fallback": v["fallback"]} for k, v in results["directions"].items()},
          "config": results["config"]})  # fmt: skip


if __name__ == "__main__":
    main()
