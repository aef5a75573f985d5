#!/usr/bin/env python
"""Can the embedded model do each double-multiple-choice sub-task once shown a few examples?

    python analyses/subtask_learnability.py [--steps 20] [--format word]

For each sub-task: accuracy of the untrained model on the held-out items, then a plain
fine-tune on the sub-task alone (``single_mc`` train split, batch 8, ``--steps`` steps, lr
5e-5, seed 0) and its accuracy on the same held-out items, which share no question with
training. A sub-task the fine-tuned model does well above chance is one the model "can do";
the double multiple-choice task needs that of both its questions. Writes
results/subtask_learnability.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import caft_tl as ct

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--format", default="word", choices=["word", "letter"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "subtask_learnability.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = ct.load_model(device="cpu")
    cfg = ct.TrainConfig(max_steps=args.steps, lr=5e-5, batch_size=8, warmup_steps=2,
                         progress=False)  # fmt: skip
    rows = []
    for sub in ct.tasks.SUBTASKS:
        test = ct.tasks.single_mc(sub, "test", answer_format=args.format)
        train = ct.tasks.single_mc(sub, "train", answer_format=args.format)
        before = ct.evals.multiple_choice(base, test)["accuracy"]
        after = ct.evals.multiple_choice(ct.finetune(base, train, cfg), test)["accuracy"]
        row = {"subtask": sub, "n_test": len(test), "base": before, "finetuned": after}
        rows.append(row)
        print(json.dumps(row), flush=True)
        # Written after every sub-task: a run stopped half-way keeps what it measured.
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"format": args.format, "steps": args.steps, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
