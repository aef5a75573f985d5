#!/usr/bin/env python
"""The CAFT paper's own task data through this project's pipeline (issue 22).

    python analyses/reference_data.py --data ../shared/reference/data
    python analyses/reference_data.py --data DIR --finetune --seeds 0 --epochs 3

Reads the paper's gender CSV (doctor / nurse, the per-category 80/20 split) and double
multiple-choice sub-task CSVs from ``--data`` with ``ct.tasks.load_reference_gender`` and
``ct.tasks.load_reference_double_mc`` (nothing is copied into the project), reports the
split sizes and the embedded model's accuracy before fine-tuning, and with ``--finetune``
runs the evidence search's plain fine-tune on each (lr 3e-5, constant after 5 warm-up
steps, batch 8, evaluated after every epoch). Answers are words (``pronoun`` / ``word``
format), as everywhere on the 135M model. Writes ``results/reference_data.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# File names of the paper's sub-tasks, by this project's sub-task names where they match.
SUBTASK_FILES = {"sentiment": "sentiment.csv", "verbs": "sva.csv", "pronouns": "gender_mc.csv",
                 "sports": "sports.csv"}  # fmt: skip
DEFAULT_PAIRS = ["sentiment|sports", "verbs|sentiment:second"]


def reference_tasks(data: Path, pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"train", "test", "ood"}}`` for the gender task and each double-MC pair."""
    import caft_tl as ct

    splits = ("train", "test", "ood")
    gender = data / "gender.csv"
    tasks = {
        "ref-gender:doctor|nurse": {
            s: ct.tasks.load_reference_gender(gender, s, answer_format="pronoun") for s in splits
        }
    }
    for spec in pairs:
        pair, _, position = spec.partition(":")
        intended, distractor = pair.split("|")
        files = (data / SUBTASK_FILES[intended], data / SUBTASK_FILES[distractor])
        tasks[f"ref-dmc:{spec}"] = {
            s: ct.tasks.load_reference_double_mc(
                *files, s, names=(intended, distractor), answer_format="word",
                intended_position=position or "first",
            )
            for s in splits
        }  # fmt: skip
    return tasks


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# The CAFT paper's data through caft-tl, embedded model (issue 22)",
        "",
        "Loaded from a local copy with `ct.tasks.load_reference_*` (not part of this project). "
        "`base`: before fine-tuning; `epoch N`: the evidence search's plain fine-tune.",
        "",
        "| task | seed | stage | n train / test / ood | ID | OOD |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        task = r["task"].replace("|", "\\|")
        n = " / ".join(str(r["n"][s]) for s in ("train", "test", "ood"))
        lines.append(
            f"| {task} | {r.get('seed', '-')} | {r['stage']} | {n} | {r['id']:.2f} | "
            f"{r['ood']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with the CSVs")
    names = ", ".join(SUBTASK_FILES)
    parser.add_argument("--pairs", nargs="*", default=DEFAULT_PAIRS,
                        help=f"INTENDED|DISTRACTOR[:second] from {names}")  # fmt: skip
    parser.add_argument("--finetune", action="store_true", help="also plain fine-tunes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import torch
    from evidence_search import run_one

    import caft_tl as ct

    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = ct.load_model(device="cpu")
    rows = []
    for name, splits in reference_tasks(args.data, args.pairs).items():
        n = {s: len(d) for s, d in splits.items()}
        acc = {s: ct.evals.multiple_choice(base, splits[s])["accuracy"] for s in ("test", "ood")}
        rows.append({"task": name, "stage": "base", "n": n, "id": acc["test"], "ood": acc["ood"]})
        print(json.dumps(rows[-1]), flush=True)
        for seed in args.seeds if args.finetune else []:
            run = run_one(base, name, seed, args.epochs, splits=splits)
            for e in run["epochs"]:
                rows.append({"task": name, "seed": seed, "stage": f"epoch {e['epoch']}", "n": n,
                             "id": e["test"]["accuracy"], "ood": e["ood"]["accuracy"]})  # fmt: skip
        out = HERE / "results"
        (out / "reference_data.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "reference_data.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
