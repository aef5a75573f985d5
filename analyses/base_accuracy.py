#!/usr/bin/env python
"""Accuracy of the untrained embedded model on every built-in task (issue 5's record).

    python analyses/base_accuracy.py [--n 200] [--out analyses/results/base_accuracy.json]

For each task: option accuracy (the correct letter's logit beats the other's) and vocabulary
accuracy (the correct letter is the argmax over the whole vocabulary), with counts, on the
held-out splits ("test" and "ood"), in the reference's letter format and with the options
as words. Chance is 0.5 for option accuracy. Prints one line per task and split and writes
JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import caft_tl as ct

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="gender examples per split")
    parser.add_argument("--n-double", type=int, default=100, help="double-MC examples per split")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "base_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    model = ct.load_model(device="cpu")
    tasks: dict[str, dict[str, object]] = {}
    for fmt in ("letter", "pronoun"):
        tasks[f"gender_pronoun [{fmt}]"] = {
            s: ct.tasks.gender_pronoun(s, n=args.n, answer_format=fmt) for s in ("test", "ood")
        }
    for fmt in ("letter", "word"):
        for sub in ct.tasks.SUBTASKS:
            data = ct.tasks.single_mc(sub, "test", answer_format=fmt)
            tasks[f"single {sub} [{fmt}]"] = {"test": data}
    for intended, distractor in ct.tasks.double_mc_pairs():
        tasks[f"double {intended}|{distractor} [word]"] = {
            s: ct.tasks.double_mc(intended, distractor, s, n=args.n_double, answer_format="word")
            for s in ("test", "ood")
        }
    rows = []
    for name, splits in tasks.items():
        for split, data in splits.items():
            r = ct.evals.multiple_choice(model, data)
            rows.append(
                {
                    "task": name,
                    "split": split,
                    "accuracy": r["accuracy"],
                    "vocab_accuracy": r["vocab_accuracy"],
                    "option_mass": r["option_mass"],
                    "n": r["n"],
                }
            )
            print(
                f"{name:32s} {split:5s} acc {r['accuracy']:.3f} vocab {r['vocab_accuracy']:.3f}"
                f" mass {r['option_mass']:.3f} n {r['n']}",
                flush=True,
            )
    result = {
        "model": model.cfg.model_name,
        "n_per_split": args.n,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")


if __name__ == "__main__":
    main()
