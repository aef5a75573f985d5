"""``caft-tl diagnose ...``: steering-vs-ablation diagnostics for a ConceptSet.

    caft-tl diagnose shift CONCEPTS [--task T | --data F] [--mode zero] [--probe] [--sae DIR]
    caft-tl diagnose steer CONCEPTS [--task T | --data F] [--coefs -5 ... 5]
    caft-tl diagnose decompose CONCEPTS --task T [--seeds 0 1 2] [--steps 30] [--ks 3 5]
    caft-tl diagnose all CONCEPTS [--task T | --data F] [--train]   (all of them + report.html)

Every command writes into ``--out`` (tables as CSV, figures as HTML) and prints its table.
``--task`` is ``gender_pronoun`` or ``double_mc:INTENDED|DISTRACTOR`` (generated offline;
``--split``, default ood); ``--data`` is a JSONL of multiple-choice rows (``prompt``,
``options``, ``answer``), chat JSONL, or ``.txt`` with one text per line. ``--probe`` adds the
task's contrast sets (e.g. female vs male sentences) as a difference-of-means probe.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from caft_tl.cli import common

DEFAULT_TASK = "gender_pronoun"


def _task_fns(task: str) -> tuple[Any, dict[str, list[str]]]:
    from caft_tl.demo import DemoConfig, task_functions

    return task_functions(DemoConfig(task=task))


def _data(args: argparse.Namespace):
    if args.data:
        if args.task:
            raise ValueError("give --task or --data, not both")

        # Multiple-choice rows are prompt/answer rows with options: the same reader.
        return common.read_train_data(args.data, "data")
    gen, _ = _task_fns(args.task or DEFAULT_TASK)
    return gen(args.split, args.n)


def _setup(args: argparse.Namespace):
    from caft_tl.directions import ConceptSet

    concepts = ConceptSet.load(args.concepts)
    model = common.load(args.model, args.device, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return model, concepts, out


def _probe(args: argparse.Namespace, model, concepts):
    if not args.probe:
        return None
    if args.data and not args.task:
        raise ValueError("--probe uses a task's contrast sets: give --task")
    from caft_tl.directions import mean_difference

    _, hints = _task_fns(args.task or DEFAULT_TASK)
    (a, texts_a), (b, texts_b) = list(hints.items())[:2]
    return mean_difference(model, texts_a, texts_b, concepts.hooks, label=f"{a}-{b}")


def _saes(paths: list[str] | None, device: str | None):
    from caft_tl.directions import load_sae

    return [load_sae(p, device=device or "cpu") for p in paths or []]


def _shift(args, model, concepts, out: Path):
    from caft_tl.diagnostics import ablation_shift

    shift = ablation_shift(
        model, concepts, _data(args), mode=args.mode, probes=_probe(args, model, concepts),
        saes=_saes(args.sae, args.device),
    )  # fmt: skip
    shift.save(out / "shift", overwrite=True)
    shift.figure().write_html(out / "shift.html", include_plotlyjs="cdn")
    cols = ["kind", "hook", "label", "clean", "upstream", "ablated", "change", "change_sd"]
    rows = shift.table[shift.table["kind"] != "sae"]
    print(f"Where {args.mode}-ablation moves the model ({shift.meta['n_tokens']} tokens):")
    print(rows[[c for c in cols if c in rows]].to_string(index=False))
    if (shift.table["kind"] == "sae").any():
        print("\nSAE latents moved most:")
        print(shift.top_latents(10)[["hook", "index", "clean", "ablated", "change"]].to_string())
    return shift


def _steer(args, model, concepts, out: Path):
    from caft_tl.diagnostics import sign_sentences, steering_vs_ablation

    sweep = steering_vs_ablation(
        model, concepts, _data(args), coefs=args.coefs, per_direction=not args.all_only
    )
    sweep.save(out / "steer", overwrite=True)
    sweep.figure().write_html(out / "steer.html", include_plotlyjs="cdn")
    report = sweep.sign_report()
    report.to_csv(out / "sign_report.csv", index=False)
    metric = sweep.default_metric
    wide = sweep.table.pivot_table(index=["condition", "coef"], columns="directions", values=metric)
    print(f"\n{metric} under ablation and steering (coef x mean projection):")
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))
    print("\nSign report:")
    for sentence in sign_sentences(report):
        print(" -", sentence)
    return sweep


def _decompose(args, model, concepts, out: Path) -> pd.DataFrame:
    from caft_tl.diagnostics import decomposition_figure, decomposition_table
    from caft_tl.diagnostics import training_decomposition as decompose
    from caft_tl.train import TrainConfig

    if args.data:
        raise ValueError("decompose trains on a built-in task: give --task, not --data")
    gen, _ = _task_fns(args.task or DEFAULT_TASK)
    train = gen("train", args.n_train)
    splits = {"test": gen("test", args.n), "ood": gen("ood", args.n)}
    cfg = TrainConfig(
        max_steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        warmup_steps=min(3, args.steps - 1), progress=False,
    )  # fmt: skip
    results = decompose(
        model, train, concepts, splits, cfg, out / "decomposition", seeds=args.seeds, ks=args.ks
    )
    results.to_csv(out / "decomposition.csv", index=False)
    decomposition_figure(results).write_html(out / "decomposition.html", include_plotlyjs="cdn")
    print("\nTraining decomposition (accuracy, mean [min, max] over seeds):")
    print(decomposition_table(results).to_string(float_format=lambda x: f"{x:.3f}"))
    return results


def cmd_diagnose(args: argparse.Namespace) -> int:
    from caft_tl.diagnostics import diagnostics_report

    model, concepts, out = _setup(args)
    what = args.what
    shift = _shift(args, model, concepts, out) if what in ("shift", "all") else None
    sweep = _steer(args, model, concepts, out) if what in ("steer", "all") else None
    train = what == "decompose" or (what == "all" and args.train)
    decomposition = _decompose(args, model, concepts, out) if train else None
    report = diagnostics_report(
        out / "report.html", shift=shift, sweep=sweep, decomposition=decomposition,
        title=f"Diagnostics: {args.concepts}",
    )  # fmt: skip
    print(f"\nwrote {out}/ (report: {report})")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("diagnose", help="steering-vs-ablation diagnostics for a ConceptSet")
    p.add_argument("what", choices=["shift", "steer", "decompose", "all"])
    p.add_argument("concepts", help="a saved ConceptSet folder")
    p.add_argument("--model", default="embedded", help="the base model (default: embedded)")
    p.add_argument("--task", default=None, help="gender_pronoun (default) | double_mc:A|B")
    p.add_argument("--data", default=None, help="JSONL / .txt data instead of a task")
    p.add_argument("--split", default="ood", choices=["train", "test", "ood"])
    p.add_argument("--n", type=int, default=100, help="examples generated per split")
    p.add_argument("--out", default="caft-diagnostics", help="output folder")
    p.add_argument("--mode", default="zero", choices=["zero", "mean"], help="shift: ablation")
    p.add_argument("--probe", action="store_true", help="shift: the task's contrast probe")
    p.add_argument("--sae", nargs="+", default=None, help="shift: saved SAE folders")
    p.add_argument("--coefs", type=float, nargs="+", default=list(range(-5, 6)))
    p.add_argument("--all-only", action="store_true", help="steer: all directions together only")
    p.add_argument("--train", action="store_true", help="all: also the training decomposition")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30, help="decompose: fine-tuning steps")
    p.add_argument("--n-train", type=int, default=240)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ks", type=float, nargs="+", default=[3.0, 5.0], help="steering ±k")
    p.set_defaults(func=cmd_diagnose)
