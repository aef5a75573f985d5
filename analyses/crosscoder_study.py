#!/usr/bin/env python
"""Crosscoder diffing of the embedded model and a plain fine-tune (BatchTopK vs L1).

    python analyses/crosscoder_study.py [--task gender_pronoun] [--hook blocks.12.hook_resid_post]

``--task gender_pronoun`` (default) uses the gender study's plain seed-0 fine-tune (``python
analyses/gender_study.py`` first); ``--task "gender2:doctor|nurse"`` the evidence
comparison's (``python analyses/evidence_comparison.py`` first), as pre-registered in
amendment 3 of ``results/evidence_search/PREREGISTRATION.md``. Caches paired activations at
one hook on the task's training prompts, generic chat prompts and the gender contrast
sentences; trains a BatchTopK and an L1 crosscoder on them (runs are resumable and reused);
classifies latents by relative decoder norm; runs Latent Scaling; and asks whether the
genuine fine-tune-only latents are about gender (AUROC of their directions on the contrast
sentences, against random directions). Writes ``results/crosscoder_study.*`` (gender2:
``results/crosscoder_study_gender2.*``); artefacts go to the study's ``crosscoder/`` folder.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from _study import RESULTS, save

import caft_tl as ct
from caft_tl.data import chat_to_text
from caft_tl.directions import (
    CrosscoderConfig,
    CrosscoderDiff,
    diff_crosscoder,
    hinted_scores,
    latent_examples,
    load_crosscoder,
    random_directions,
    train_crosscoder,
)

# task -> (study folder holding runs/s0/plain/final, results name)
STUDIES = {
    "gender_pronoun": (RESULTS / "studies" / "gender_pronoun", "crosscoder_study"),
    "gender2:doctor|nurse": (
        RESULTS / "studies" / "evidence" / "gender2-doctor-nurse",
        "crosscoder_study_gender2",
    ),
}


def crosscoder_folder(task: str, hook: str):
    """Where the crosscoders of ``task``'s study live (one sub-folder per architecture)."""
    return STUDIES[task][0] / "crosscoder" / hook.replace(".", "_")


def texts(model, task: str) -> list[str]:
    if task == "gender_pronoun":
        train = ct.tasks.gender_pronoun("train", n=600, answer_format="pronoun")
    else:  # the comparison's whole training split
        train = ct.tasks.gender_two_professions("train", male="doctor", female="nurse")
    task_texts = [p + a for p, a in zip(train["prompt"], train["answer"], strict=True)]
    chats = ct.tasks.chat_prompts()["messages"]
    chat = [chat_to_text(m, model.tokenizer, add_generation_prompt=True) for m in chats]
    contrast = ct.tasks.gender_contrast()
    return task_texts + chat + contrast["female"] + contrast["male"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(STUDIES), default="gender_pronoun")
    parser.add_argument("--hook", default="blocks.12.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=400_000, help="training rows per coder")
    parser.add_argument("--n-latents", type=int, default=2304)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--l1", type=float, default=3.0, help="L1 coefficient")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    study, result_name = STUDIES[args.task]
    plain = study / "runs" / "s0" / "plain" / "final"
    if not plain.exists():
        first = "gender_study.py" if args.task == "gender_pronoun" else "evidence_comparison.py"
        raise SystemExit(f"no plain fine-tune in {plain}: run analyses/{first} first")
    base, ft = ct.load_model(device="cpu"), ct.load_model(plain, device="cpu")
    out = crosscoder_folder(args.task, args.hook)
    acts = out / "acts"
    if not (acts / "base" / "meta.json").exists():
        ct.activation_diff(base, ft, texts(base, args.task), args.hook, out=acts, return_both=True)
    common = dict(
        n_latents=args.n_latents, training_tokens=args.tokens, batch_size=1024, lr=5e-4,
        warmup_steps=50, dead_tokens=200_000, checkpoint_every=100,
    )  # fmt: skip
    coders = {
        "batchtopk": CrosscoderConfig(architecture="batchtopk", k=args.k, **common),
        "l1": CrosscoderConfig(architecture="l1", l1_coefficient=args.l1, **common),
    }
    rows, diffs, record = [], {}, {}
    hints = ct.tasks.gender_contrast()
    for name, cfg in coders.items():
        run = out / name
        if (run / "crosscoder").exists():
            cc = load_crosscoder(run)
        else:
            cc = train_crosscoder(acts, cfg, out=run, resume=True)
        diff_dir = run / "diff"
        diff = CrosscoderDiff.load(diff_dir) if diff_dir.exists() else diff_crosscoder(cc, acts)
        if not diff_dir.exists():
            diff.save(diff_dir)
        diffs[name] = diff
        summary = diff.summary().set_index("class")
        ft_only = summary.loc["finetuned-only"]
        genuine = diff.genuine()
        gender = _gender_auroc(ft, diff, cc, hints) if len(genuine) else None
        rows.append({
            "crosscoder": name, "fvu_base": diff.meta["fvu"]["base"],
            "fvu_finetuned": diff.meta["fvu"]["finetuned"],
            "l0": cc.meta["log"][-1]["l0"], "live": int((diff.table["class"] != "dead").sum()),
            "shared": int(summary.loc["shared", "latents"]),
            "finetuned_only": int(ft_only["latents"]),
            "base_only": int(summary.loc["base-only", "latents"]),
            "complete_shrinkage": int(ft_only["complete_shrinkage"]),
            "latent_decoupling": int(ft_only["latent_decoupling"]),
            "genuine": len(genuine),
            "gender_auroc_max": None if gender is None else gender["max"],
            "random_auroc_p95": None if gender is None else gender["null_p95"],
        })  # fmt: skip
        record[name] = {
            "summary": diff.summary().to_dict("records"),
            "genuine": genuine.head(20).to_dict("records"),
            "gender": gender,
            "log_last": cc.meta["log"][-1],
        }
        if len(genuine):
            ex = latent_examples(cc, acts, genuine["latent"].head(5).tolist(), base, k=3)
            record[name]["examples"] = ex.to_dict("records")
            print(ex.to_string(index=False, max_colwidth=90))
    table = pd.DataFrame(rows).set_index("crosscoder")
    print(table.T.to_string())
    figures = {}
    for name, diff in diffs.items():
        figures[f"{name}_norms"] = diff.norm_figure()
        figures[f"{name}_nu"] = diff.nu_figure()
    save(
        result_name,
        table.T,
        figures,
        {
            "task": args.task,
            "hook": args.hook,
            "config": {k: v.to_dict() for k, v in coders.items()},
            "n_rows": len(diffs["l1"].table),
            **record,
        },
    )


def _gender_auroc(model, diff, cc, hints) -> dict:
    """Paired AUROC (female vs male contrast sentences) of the genuine latents' directions,
    against the same statistic for random directions at the hook (the gender study's null)."""
    concepts = diff.concepts(cc)
    scores = hinted_scores(model, concepts, hints["female"], hints["male"], paired=True)
    null = random_directions(ct.ConceptSet({cc.hook: torch.randn(100, cc.d_in)}), seed=1)
    null_scores = hinted_scores(model, null, hints["female"], hints["male"], paired=True)
    return {
        "max": float(scores["auroc"].max()),
        "top": scores.sort_values("auroc", ascending=False).head(5).to_dict("records"),
        "null_p95": float(null_scores["auroc"].quantile(0.95)),
    }


if __name__ == "__main__":
    main()
