"""Shared by the spurious-correlation studies: run one task's study and tabulate it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per run")
    parser.add_argument("--n-eval", type=int, default=100, help="examples per split")
    parser.add_argument("--sae", action="store_true", help="also SAE latents as concepts")
    parser.add_argument("--answer-format", default=None, help="letter | pronoun | word")
    parser.add_argument("--out", type=Path, default=None, help="artefacts (default: results/)")


def run(task: str, args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The study of ``caft-tl demo`` for ``task`` (artefacts reused between runs)."""
    from caft_tl.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        task=task, seeds=args.seeds, max_steps=args.steps, n_eval=args.n_eval, sae=args.sae,
        answer_format=args.answer_format, learned_less_step=max(1, args.steps // 2),
        n_train=max(8 * args.steps, 8),
    )  # fmt: skip
    folder = (args.out or RESULTS / "studies") / task.replace(":", "-").replace("|", "-")
    return run_demo(folder, cfg, model=model)


def ood_table(results: dict[str, Any]) -> pd.Series:
    """OOD accuracy per method as the reference prints it: mean [min, max] over seeds."""
    df = pd.DataFrame(results["summary"])
    df = df[df["split"] == "ood"].set_index("method")
    return pd.Series({m: _cell(r) for m, r in df.iterrows()})


def _cell(r: pd.Series) -> str:
    if r["n_seeds"] > 1:
        return f"{r['mean']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
    return f"{r['mean']:.2f}"


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs the optional tabulate package)."""
    head = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for index, row in table.iterrows():
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([str(index), *cells]) + " |")
    return "\n".join(lines)


def save(name: str, table: pd.DataFrame, figures: dict[str, Any], extra: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(markdown(table) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    for fig_name, fig in figures.items():
        fig.write_html(RESULTS / f"{name}_{fig_name}.html", include_plotlyjs="cdn")
    print(f"\nwrote {RESULTS / name}.md/.json and figures")
