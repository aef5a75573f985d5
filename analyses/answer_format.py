#!/usr/bin/env python
"""Can the embedded model learn the gender task when it must answer with a letter?

    python analyses/answer_format.py [--steps 30] [--lrs 3e-5 1e-4]

Plain fine-tunes (batch 8, ``--steps`` steps, seed 0) on the gender-pronoun training split
in the reference's letter format ("A) she / B) him ... Answer: A") and with the pronouns as
the options ("Options: she, him ... Answer: she"), at each learning rate; prints and saves
ID (test) and OOD accuracy and the probability the model puts on the options. Why
``caft-tl demo`` uses the word format on the embedded model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import caft_tl as ct

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "answer_format.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = ct.load_model(device="cpu")
    rows = []
    for fmt in ("letter", "pronoun"):
        data = {
            s: ct.tasks.gender_pronoun(s, n=args.n_eval if s != "train" else 8 * args.steps,
                                       answer_format=fmt)
            for s in ("train", "test", "ood")
        }  # fmt: skip
        for lr in args.lrs:
            started = time.perf_counter()
            cfg = ct.TrainConfig(max_steps=args.steps, lr=lr, batch_size=8,
                                 warmup_steps=max(1, args.steps // 10), progress=False)  # fmt: skip
            model = ct.finetune(base, data["train"], cfg)
            row = {"format": fmt, "lr": lr, "steps": args.steps}
            for split in ("test", "ood"):
                r = ct.evals.multiple_choice(model, data[split])
                row[split] = r["accuracy"]
                row[f"{split}_option_mass"] = r["option_mass"]
            row["seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            # Written after every run: a long study killed half-way keeps what it measured.
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {"model": base.cfg.model_name, "rows": rows}
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
