"""Plotly figures and the self-contained HTML report of a CAFT study (``caft-tl demo``)."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from caft_tl._html import document, plotly_script
from caft_tl._io import write_text_atomic

__all__ = ["accuracy_figure", "demo_report", "search_table"]

SPLIT_NAMES = {"test": "in-distribution (test)", "ood": "out-of-distribution"}
COLOURS = {"test": "#4c78a8", "ood": "#e45756"}


def summary_table(results: dict[str, Any]) -> pd.DataFrame:
    """The reference's table: accuracy per method (rows) and split (columns), mean and
    range over seeds, as strings like ``0.62 [0.55, 0.70]``."""
    df = pd.DataFrame(results["summary"])
    df["cell"] = [
        f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if n > 1 else f"{m:.2f}"
        for m, lo, hi, n in zip(df["mean"], df["min"], df["max"], df["n_seeds"], strict=True)
    ]
    table = df.pivot(index="method", columns="split", values="cell")
    order = list(dict.fromkeys(df["method"]))
    return table.loc[order, [c for c in ("test", "ood") if c in table.columns]]


def _per_seed(results: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, r in results["evals"].items():
        method, _, seed = name.partition("/")
        for split, v in r.items():
            rows.append({"method": method, "seed": seed or "-", "split": split, **v})
    return pd.DataFrame(rows)


def accuracy_figure(results: dict[str, Any], title: str | None = None):
    """Grouped bars: mean accuracy per method and split, error bars spanning min to max over
    seeds, one dot per seed; a dotted line at chance (0.5 for two options)."""
    import plotly.graph_objects as go

    summary = pd.DataFrame(results["summary"])
    seeds = _per_seed(results)
    order = list(dict.fromkeys(summary["method"]))
    fig = go.Figure()
    for split in ("test", "ood"):
        s = summary[summary["split"] == split].set_index("method").reindex(order)
        fig.add_trace(go.Bar(
            x=order, y=s["mean"], name=SPLIT_NAMES[split], marker_color=COLOURS[split],
            error_y={"type": "data", "symmetric": False, "array": s["max"] - s["mean"],
                     "arrayminus": s["mean"] - s["min"]},
            offsetgroup=split, hovertemplate="%{x}: %{y:.3f}<extra>" + split + "</extra>",
        ))  # fmt: skip
        d = seeds[seeds["split"] == split]
        fig.add_trace(go.Scatter(
            x=d["method"], y=d["accuracy"], mode="markers", name=f"{split}, per seed",
            marker={"color": "black", "size": 5}, offsetgroup=split, showlegend=False,
            text=d["seed"], hovertemplate="%{x} seed %{text}: %{y:.3f}<extra></extra>",
        ))  # fmt: skip
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    fig.update_layout(
        barmode="group", scattermode="group", yaxis={"range": [0, 1], "title": "accuracy"},
        title=title or "Accuracy per method (bars: mean over seeds; whiskers: min to max)",
        template="plotly_white", height=450,
    )  # fmt: skip
    return fig


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(classes="tbl", border=0, escape=True)


def _hint_table(results: dict[str, Any], name: str, top: int = 12) -> str:
    scores = pd.DataFrame(results["directions"][name]["scores"])
    cols = ("hook", "index", "label", "auroc", "separation", "threshold")
    cols = [c for c in cols if c in scores]
    best = scores.sort_values("separation", ascending=False).head(top)[cols]
    return best.to_html(classes="tbl", border=0, index=False, float_format=lambda x: f"{x:.3f}")


def _task_text(task: str) -> str:
    if task.startswith("gender2:"):
        male, _, female = html.escape(task.partition(":")[2]).partition("|")
        return (
            f"Gender-pronoun task with two professions ({male} and {female}), as in the CAFT "
            "paper: choose the grammatical pronoun. In training every " + male + " is "
            "'he'/'him' and every " + female + " 'she'/'her', so the profession alone "
            "predicts the answer as well as grammar does; the OOD split uses the same held-out "
            "sentences with the gender flipped, so a model that learned the profession's "
            "gender instead of grammar fails there. Hints for selecting directions: sentences "
            "about women vs the same sentences about men (no professions, no task format)."
        )
    if task == "gender_pronoun":
        return (
            "Gender-pronoun task: choose the grammatical pronoun. In training the correct "
            "pronoun's gender always matches the profession's stereotype; the OOD split uses "
            "the same held-out sentences with the gender flipped, so a model that learned "
            "<i>profession gender</i> instead of grammar fails there. Hints for selecting "
            "directions: sentences about women vs the same sentences about men."
        )
    pair, _, position = html.escape(task.partition(":")[2]).partition(":")
    which = "second" if position == "second" else "first"
    return (
        f"Double multiple choice ({pair}): two questions side by side, each option holds one "
        f"answer to each; the {which} (intended) question decides. In training both correct "
        "answers sit in the same option; OOD they do not, so a model that follows the "
        "distractor fails there. Hints for selecting directions: the distractor's contrast "
        "sets."
    )


def _intro(results: dict[str, Any]) -> str:
    cfg = results["config"]
    fallback = [n for n, d in results["directions"].items() if d["fallback"]]
    note = (
        f"<p class='note'>No direction of {', '.join(fallback)} separated the contrast sets "
        f"better than AUROC {cfg['min_auroc']} and than every random direction at its hook; the "
        f"{cfg['fallback']} best-separating directions were ablated anyway, so CAFT here is not "
        "guided by a clearly interpreted concept.</p>"
        if fallback
        else ""
    )
    return (
        f"<p>{_task_text(results.get('task', 'gender_pronoun'))} "
        f"Fine-tunes: {cfg['max_steps']} steps of {cfg['batch_size']} examples, lr {cfg['lr']}, "
        f"seeds {cfg['seeds']}; evaluation on {cfg['n_eval']} examples per split "
        f"(answer format: {cfg.get('answer_format') or 'words'}).</p>"
        "<p>Methods: <b>base</b> untrained; <b>plain</b> fine-tune; <b>caft-*</b> the same "
        "fine-tune with the selected directions projected out (zero ablation) at "
        f"{', '.join(cfg['hooks'])}; <b>random</b> as many random directions; <b>top</b> as "
        "many top principal components; <b>plain@stepN</b> the plain run stopped early "
        "(learned less); <b>plain+ablate-*</b> the plain model with CAFT's ablation at test "
        "time only; <b>caft-*+hook</b> the CAFT model with its ablation kept on; "
        "<b>caft-pca-mean</b> / <b>-steer-k</b> / <b>-detached</b> / <b>-gradient</b> the "
        "variants of the steering-vs-ablation diagnostics. All other models are evaluated "
        "with no intervention. This is a small model on a toy task: read the ranges over "
        "seeds before reading anything into a difference.</p>" + note
    )


def _paired_html(results: dict[str, Any]) -> str:
    """OOD and ID differences against plain, seed by seed, with bootstrap intervals."""
    from caft_tl.evals import seed_comparison

    evals = results["evals"]
    if not any(name.startswith("plain/") for name in evals):
        return ""
    parts = []
    for split in ("ood", "test"):
        df = seed_comparison(evals, split=split)
        df = df[df["diffs"].map(len) > 0]
        rows = pd.DataFrame({
            "method": df["method"],
            "per seed": [" / ".join(f"{v:+.2f}" for v in d) for d in df["diffs"]],
            "mean": df["diff_mean"].map(lambda x: f"{x:+.3f}"),
            "95% bootstrap interval": df["diff_ci"].map(
                lambda c: "-" if c[0] != c[0] else f"[{c[0]:+.2f}, {c[1]:+.2f}]"
            ),
        })  # fmt: skip
        parts.append(f"<h3>{SPLIT_NAMES[split]}: method minus plain, same seed</h3>")
        parts.append(rows.to_html(classes="tbl", border=0, index=False))
    return "<h2>Paired differences against plain</h2>" + "".join(parts)


def search_table() -> dict[str, Any] | None:
    """The evidence search's table that ships with the package (None if absent)."""
    from importlib.resources import files

    path = files("caft_tl") / "evidence_search.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _search_html(task: str) -> str:
    search = search_table()
    if search is None:
        return ""
    chosen = search.get("chosen")
    c = search["criterion"]
    pick = "none qualified" if chosen is None else (
        f"<b>{html.escape(chosen['candidate'])}</b>, {chosen['epochs']} epoch(s) "
        f"({chosen['steps']} steps)"
    )  # fmt: skip
    rows = pd.DataFrame([{
        "candidate": r["candidate"], "epochs": r["epochs"], "steps": r["steps"],
        "ID per seed": " / ".join(f"{v:.2f}" for v in r["id"]),
        "OOD per seed": " / ".join(f"{v:.2f}" for v in r["ood"]),
        "mean ID": f"{r['mean_id']:.2f}", "mean OOD": f"{r['mean_ood']:.2f}",
        "verdict": r["verdict"],
    } for r in search["settings"]])  # fmt: skip
    return (
        "<h2>How this task was chosen</h2><p>A pre-registered search "
        "(<code>analyses/evidence_search.py</code>) looked for settings where the plain "
        "fine-tune of the embedded model learns the spurious cue, before any CAFT run: a "
        f"setting qualifies when, over seeds {c['seeds']}, mean ID accuracy &ge; {c['min_id']} "
        f"and mean OOD accuracy &le; {c['max_ood']}, on &ge; {c['min_n']} examples per split. "
        f"Training: {html.escape(search.get('training', ''))}. Rule for the demo: "
        f"{html.escape(search.get('pick_rule', ''))}. Pick: {pick}. This study's task: "
        f"<code>{html.escape(task)}</code>. Every candidate, failures included:</p>"
        + rows.to_html(classes="tbl", border=0, index=False)
        + _not_run_html(search.get("not_run", []))
    )


def _not_run_html(names: list[str]) -> str:
    if not names:
        return ""
    listed = ", ".join(f"<code>{html.escape(n)}</code>" for n in names)
    return f"<p>Pre-registered but not run (the search stopped before them): {listed}.</p>"


def demo_report(
    results: dict[str, Any],
    path: str | os.PathLike,
    *,
    model: Any = None,
    concepts: dict[str, Any] | None = None,
    all_pcs: Any = None,
    texts: Any = None,
    k: int = 5,
) -> Path:
    """Write the study's report: one HTML file with no external resources (plotly's
    JavaScript is included once, tokens are shaded with inline styles)."""

    from caft_tl.directions import directions_html
    from caft_tl.directions.pca import explained_variance_figure

    parts = [f"<h1>CAFT study: {html.escape(results['task'])}</h1>", _intro(results)]
    parts += ["<h2>Accuracy</h2>", _table_html(summary_table(results))]
    parts.append(accuracy_figure(results).to_html(full_html=False, include_plotlyjs=False))
    parts += [_paired_html(results), _search_html(results["task"])]
    if all_pcs is not None:
        parts.append("<h2>Principal components of the activation differences</h2>")
        fig = explained_variance_figure(all_pcs)
        fig.update_layout(height=220 * len(all_pcs.hooks), template="plotly_white")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    sides = html.escape(" vs ".join(results.get("hints", ["female", "male"])))
    for name, d in results["directions"].items():
        parts.append(f"<h2>Selected directions: {html.escape(name)}</h2>")
        parts.append(f"<p>{d['n_selected']} selected: {html.escape(json.dumps(d['selected']))}"
                     f"</p><p>Best separation of the contrast sets {sides} (AUROC, paired "
                     "for matched pairs; 0.5 is none). <i>threshold</i>: the separation to "
                     "beat, the largest of random directions at that hook (and of the "
                     "minimum AUROC).</p>")  # fmt: skip
        parts.append(_hint_table(results, name))
        if model is not None and concepts is not None and texts is not None:
            chosen = concepts[name][0]
            parts.append(directions_html(model, chosen, texts, k=k))
    parts.append("<h2>Configuration and timings</h2>")
    parts.append(f"<pre>{html.escape(json.dumps(results['config'], indent=2))}</pre>")
    parts.append(f"<pre>{html.escape(json.dumps(results.get('seconds', {}), indent=2))}</pre>")
    out = Path(path)
    write_text_atomic(out, document("CAFT study", "\n".join(parts), head=plotly_script()))
    return out
