#!/usr/bin/env python
"""Steering vs ablation on the base model with the gender study's ConceptSet (no training).

    python analyses/steering_study.py [--n 100] [--coefs -5 ... 5]

Answers the first three questions of the diagnostics on the embedded base model and the
gender task's OOD split: where zero-ablating the demo's directions moves the model (their
projections and a female-minus-male probe), how zero- and mean-ablation compare with steering
by c x the mean projection, and the sign report. Needs the gender study's artefacts
(``python analyses/gender_study.py`` first). Writes results/steering_study.{md,json} and
figures; the full tables go to results/studies/gender_pronoun/diagnostics/.
"""

from __future__ import annotations

import argparse

import torch
from _study import RESULTS, save

import caft_tl as ct
from caft_tl.diagnostics import ablation_shift, sign_sentences, steering_vs_ablation

STUDY = RESULTS / "studies" / "gender_pronoun"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="OOD examples")
    parser.add_argument("--coefs", type=float, nargs="+", default=list(range(-5, 6)))
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not (STUDY / "concepts" / "pca").exists():
        raise SystemExit(f"no gender study in {STUDY}: run analyses/gender_study.py first")
    concepts = ct.ConceptSet.load(STUDY / "concepts" / "pca")
    base = ct.load_model(device="cpu")
    ood = ct.tasks.gender_pronoun("ood", n=args.n, answer_format="pronoun")
    hints = ct.tasks.gender_contrast()
    probe_hooks = [f"blocks.{layer}.hook_resid_post" for layer in (6, 12, 18, 24)]
    probe = ct.directions.mean_difference(
        base, hints["female"], hints["male"], probe_hooks, label="female-male"
    )
    out = STUDY / "diagnostics"
    shift = ablation_shift(base, concepts, ood, probes=probe)
    shift.save(out / "shift", overwrite=True)
    sweep = steering_vs_ablation(base, concepts, ood, coefs=args.coefs)
    sweep.save(out / "steer", overwrite=True)
    report = sweep.sign_report()
    sentences = sign_sentences(report)

    cols = ["kind", "hook", "label", "clean", "upstream", "ablated", "change", "change_sd"]
    print(shift.table[cols].to_string(index=False))
    wide = sweep.table.pivot_table(index=["condition", "coef"], columns="directions",
                                   values=["logit_diff", "accuracy"])  # fmt: skip
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))
    print("\n".join(sentences))
    table = report.set_index("directions").drop(columns="metric")
    save("steering_study", table, {"steering": sweep.figure(), "shift": shift.figure()}, {
        "concepts": concepts.labels, "n_ood": args.n, "coefs": sweep.meta["coefs"],
        "mean_projection": sweep.meta["mean_projection"], "sign_report": report.to_dict("records"),
        "sentences": sentences, "shift": shift.table.to_dict("records"),
        "sweep": sweep.table.to_dict("records"),
    })  # fmt: skip


if __name__ == "__main__":
    main()
