#!/usr/bin/env python
"""Pre-registered search for settings where a plain fine-tune learns the spurious cue.

    python analyses/evidence_search.py [--candidates gender2:doctor|nurse ...] [--seeds 0 1 2]
    python analyses/evidence_search.py --cached      # tabulate finished runs only

The criterion, the training settings and the order of candidates are fixed in
``results/evidence_search/PREREGISTRATION.md`` (committed before any run). For each
candidate and seed: one plain fine-tune (lr 3e-5, constant after 5 warm-up steps, batch 8)
evaluated on the ``test`` (in distribution) and ``ood`` splits at the end of every epoch;
every epoch is a candidate training length. Each run is cached as
``results/evidence_search/runs/<candidate>/s<seed>.json`` (a killed run restarts that run),
and the table of every candidate, failures included, is rewritten after each run:
``results/evidence_search.md`` and ``caft_tl/evidence_search.json`` (shipped with the
package, so the demo's report can show how its default task was chosen).

Candidate names: ``gender2:MALE|FEMALE`` (:func:`caft_tl.tasks.gender_two_professions`) and
``dmc:INTENDED|DISTRACTOR:first|second`` (:func:`caft_tl.tasks.double_mc`, word format, the
intended question shown first or second).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FOLDER = HERE / "results" / "evidence_search"
DEFAULT_CANDIDATES = ["gender2:doctor|nurse"]
CRITERION = {"min_id": 0.90, "max_ood": 0.30, "min_n": 150, "seeds": [0, 1, 2]}
SCREEN_OOD = 0.60  # seed 0 above this at every length: seeds 1-2 are not run
DMC_N = {"train": 320, "test": 200, "ood": 200}
PICK_RULE = "among qualifying settings, the fewest training steps, then the lowest mean OOD"
TRAINING = "full fine-tune, AdamW lr 3e-5, batch 8, 5 warm-up steps then constant, seeds 0-2"
PACKAGE_COPY = HERE.parent / "caft_tl" / "evidence_search.json"


def all_candidates() -> list[str]:
    """Every pre-registered candidate, in the pre-registered order (amendment 2 for the
    double multiple-choice ones: intended pronouns first, the rest in ``SUBTASKS`` order;
    the intended question shown first, then second)."""
    import caft_tl as ct

    pairs = sorted(ct.tasks.double_mc_pairs(), key=lambda pair: pair[0] != "pronouns")
    dmc = [f"dmc:{i}|{d}:{pos}" for i, d in pairs for pos in ("first", "second")]
    return DEFAULT_CANDIDATES + dmc


def candidate_splits(name: str) -> dict[str, Any]:
    """``{"train", "test", "ood"}`` Datasets of a candidate (see the module docstring)."""
    import caft_tl as ct

    kind, _, rest = name.partition(":")
    if kind == "gender2":
        male, female = rest.split("|")
        return {
            s: ct.tasks.gender_two_professions(s, male=male, female=female)
            for s in ("train", "test", "ood")
        }
    if kind == "dmc":
        pair, _, position = rest.partition(":")
        intended, distractor = pair.split("|")
        return {
            s: ct.tasks.double_mc(
                intended, distractor, s, n=DMC_N[s], answer_format="word",
                intended_position=position or "first",
            )
            for s in ("train", "test", "ood")
        }  # fmt: skip
    raise ValueError(f"unknown candidate {name!r} (gender2:M|F or dmc:I|D:first|second)")


def train_config(seed: int, epochs: int):
    import caft_tl as ct

    return ct.TrainConfig(
        epochs=epochs, lr=3e-5, batch_size=8, warmup_steps=5, schedule="constant",
        seed=seed, in_place=True, progress=False,
    )  # fmt: skip


def run_one(base, name: str, seed: int, epochs: int, splits: dict | None = None) -> dict:
    """One plain fine-tune, evaluated after every epoch (``splits``: the candidate's
    train/test/ood Datasets, built from ``name`` when not given)."""
    import caft_tl as ct

    splits = splits or candidate_splits(name)
    cfg = train_config(seed, epochs)
    steps_per_epoch = -(-len(splits["train"]) // cfg.batch_size)
    model = copy.deepcopy(base)  # trained in place, so the callback sees the same object
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def evaluate(record: dict[str, Any]) -> None:
        if record["step"] % steps_per_epoch:
            return
        row = {"epoch": record["step"] // steps_per_epoch, "step": record["step"]}
        for split in ("test", "ood"):
            r = ct.evals.multiple_choice(model, splits[split])
            row[split] = {k: r[k] for k in ("accuracy", "vocab_accuracy", "n", "option_mass")}
        row["elapsed_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        acc = {split: row[split]["accuracy"] for split in ("test", "ood")}
        print(f"  {name} s{seed} epoch {row['epoch']}: ID {acc['test']:.3f} "
              f"OOD {acc['ood']:.3f} ({row['elapsed_s']:.0f} s)", flush=True)  # fmt: skip

    ct.finetune(model, splits["train"], cfg, callback=evaluate)
    return {
        "candidate": name, "seed": seed, "config": cfg.to_dict(),
        "n": {s: len(d) for s, d in splits.items()}, "epochs": rows,
    }  # fmt: skip


def run_path(name: str, seed: int) -> Path:
    return FOLDER / "runs" / name.replace(":", "_").replace("|", "-") / f"s{seed}.json"


def load_runs() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(FOLDER.glob("runs/*/s*.json"))]


def settings_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (candidate, epochs): per-seed and mean accuracies, and the verdict."""
    by_setting: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["epochs"]:
            by_setting.setdefault((run["candidate"], row["epoch"]), []).append(
                {"seed": run["seed"], "step": row["step"], **row}
            )
    table = []
    order = {name: i for i, name in enumerate(all_candidates())}
    for (name, epoch), rows in sorted(
        by_setting.items(), key=lambda item: (order.get(item[0][0], len(order)), item[0])
    ):
        rows = sorted(rows, key=lambda r: r["seed"])
        ids = [r["test"]["accuracy"] for r in rows]
        oods = [r["ood"]["accuracy"] for r in rows]
        seeds = [r["seed"] for r in rows]
        n_min = min(min(r["test"]["n"], r["ood"]["n"]) for r in rows)
        complete = set(CRITERION["seeds"]) <= set(seeds)
        mean_id, mean_ood = sum(ids) / len(ids), sum(oods) / len(oods)
        qualifies = (
            complete and n_min >= CRITERION["min_n"]
            and mean_id >= CRITERION["min_id"] and mean_ood <= CRITERION["max_ood"]
        )  # fmt: skip
        table.append({
            "candidate": name, "epochs": epoch, "steps": rows[0]["step"], "seeds": seeds,
            "id": ids, "ood": oods, "mean_id": mean_id, "mean_ood": mean_ood, "n_min": n_min,
            "verdict": _verdict(qualifies, complete, screened_epochs(runs, name)),
        })  # fmt: skip
    return table


def _verdict(qualifies: bool, complete: bool, screened_epochs: int) -> str:
    """``screened_epochs``: how many epochs seed 0 ran when the screen ruled the candidate
    out (5, or 2 under amendment 4), else 0."""
    if qualifies:
        return "qualifies"
    if complete:
        return "fails"
    if screened_epochs:
        return (
            f"screened out (seed 0 OOD > {SCREEN_OOD} after each of its {screened_epochs} epochs)"
        )
    return "incomplete"


def not_run(runs: list[dict[str, Any]]) -> list[str]:
    """Pre-registered candidates without any run (amendment 2: listed, not hidden)."""
    ran = {r["candidate"] for r in runs}
    return [c for c in all_candidates() if c not in ran]


def chosen_setting(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pre-registered pick: fewest steps among qualifying settings, then lowest OOD."""
    qualifying = [r for r in table if r["verdict"] == "qualifies"]
    return min(qualifying, key=lambda r: (r["steps"], r["mean_ood"]), default=None)


def screened_out(runs: list[dict[str, Any]], name: str) -> bool:
    seed0 = [r for r in runs if r["candidate"] == name and r["seed"] == 0]
    return bool(seed0) and all(row["ood"]["accuracy"] > SCREEN_OOD for row in seed0[0]["epochs"])


def screened_epochs(runs: list[dict[str, Any]], name: str) -> int:
    """The number of epochs seed 0 ran if the screen rules ``name`` out, else 0."""
    if not screened_out(runs, name):
        return 0
    return len(next(r for r in runs if r["candidate"] == name and r["seed"] == 0)["epochs"])


def markdown(table: list[dict[str, Any]], choice: dict[str, Any] | None, missing: list[str]) -> str:
    lines = [
        "# Evidence search: plain fine-tunes of the embedded model (issue 22)",
        "",
        "Criterion (pre-registered in `evidence_search/PREREGISTRATION.md`): mean over seeds "
        "0-2 of ID >= 0.90 and OOD <= 0.30, >= 150 examples per split. Per-seed values in "
        "seed order.",
        "",
        "| candidate | epochs | steps | ID per seed | OOD per seed | mean ID | mean OOD "
        "| verdict |",
        "|---|---:|---:|---|---|---:|---:|---|",
    ]
    for r in table:
        per = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        name = r["candidate"].replace("|", "\\|")  # a bare | would split the cell
        lines.append(
            f"| {name} | {r['epochs']} | {r['steps']} | {per(r['id'])} | "
            f"{per(r['ood'])} | {r['mean_id']:.2f} | {r['mean_ood']:.2f} | {r['verdict']} |"
        )
    pick = "none yet" if choice is None else f"{choice['candidate']}, {choice['epochs']} epochs"
    lines += ["", f"Chosen for the demo (fewest steps, then lowest OOD): **{pick}**."]
    if missing:
        names = ", ".join(f"`{m}`" for m in missing)
        lines += ["", f"Not run (pre-registered, not reached; amendments 2 and 4): {names}."]
    return "\n".join(lines) + "\n"


def write_tables() -> list[dict[str, Any]]:
    runs = load_runs()
    table, missing = settings_table(runs), not_run(runs)
    choice = chosen_setting(table)
    out = {
        "criterion": CRITERION, "screen_ood": SCREEN_OOD, "pick_rule": PICK_RULE,
        "training": TRAINING, "settings": table, "chosen": choice, "not_run": missing,
    }  # fmt: skip
    # The table ships with the package: the demo's report shows how its task was chosen.
    PACKAGE_COPY.write_text(json.dumps(out, indent=2) + "\n")
    (HERE / "results" / "evidence_search.md").write_text(markdown(table, choice, missing))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    parser.add_argument("--seeds", type=int, nargs="+", default=CRITERION["seeds"])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--cached", action="store_true", help="tabulate finished runs only")
    args = parser.parse_args()
    if not args.cached:
        import torch

        import caft_tl as ct

        torch.set_num_threads(min(2, torch.get_num_threads()))
        base = ct.load_model(device="cpu")
        for name in args.candidates:
            for seed in args.seeds:
                path = run_path(name, seed)
                if path.exists():
                    continue
                if seed != 0 and screened_out(load_runs(), name):
                    print(f"{name}: screened out after seed 0 (OOD > {SCREEN_OOD} throughout)")
                    break
                result = run_one(base, name, seed, args.epochs)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2) + "\n")
                write_tables()
    for row in write_tables():
        print(f"{row['candidate']:<32} {row['epochs']} ep  ID {row['mean_id']:.2f} "
              f"OOD {row['mean_ood']:.2f}  {row['verdict']}")  # fmt: skip


if __name__ == "__main__":
    main()
