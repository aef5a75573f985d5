"""One HTML page with the diagnostics' answers: shift, steering vs ablation, sign report,
training decomposition (whichever were run). No external resources."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from caft_tl._io import write_text_atomic

__all__ = ["diagnostics_report", "sign_sentences"]

_INTRO = (
    "<p>Zero-ablation <code>h - QQ<sup>T</sup>h</code> removes the variation along the "
    "directions <i>and</i> moves the activations by <code>-QQ<sup>T</sup>h</code>, on average "
    "<code>-QQ<sup>T</sup>&mu;</code>: the residual stream has no preferred origin, so removing "
    "a projection also steers. These diagnostics show which of the two a CAFT result rests "
    "on.</p>"
)


def sign_sentences(report: pd.DataFrame) -> list[str]:
    """The sign report in words, one sentence per direction set."""
    out = []
    for r in report.itertuples():
        change = f"{r.zero_change:+.3f}"
        if not math.isnan(r.zero_se):
            change += f" ± {r.zero_se:.3f}"
        head = f"{r.directions}: zero-ablation changes {r.metric} by {change}"
        if r.acts_like == "no measurable effect":
            out.append(f"{head}, within twice its standard error: no measurable effect.")
        elif r.acts_like == "not reproduced by steering":
            out.append(f"{head}; no steering coefficient in the sweep gives that value.")
        else:
            share = "" if math.isnan(r.shift_explains) else (
                f" Its average shift alone (steering by -1) gives {r.shift_change:+.3f}, "
                f"{r.shift_explains:.0%} of it; mean-ablation (removal without the shift) "
                f"gives {r.mean_change:+.3f}."
            )  # fmt: skip
            others = [c for c in getattr(r, "crossings", []) if c != r.equivalent_coef]
            shape = "" if getattr(r, "monotone", True) else " The steering curve is not monotone"
            if others:
                listed = ", ".join(f"{c:+.2f}" for c in others)
                shape = (shape or " The curve") + f" also takes that value at c = {listed}"
            out.append(
                f"{head}: it acts like {r.acts_like} with c ≈ {r.equivalent_coef:+.1f} (the "
                f"crossing nearest -1, its average shift).{share}{shape + '.' if shape else ''}"
            )
    return out


def _fig(fig: Any) -> str:
    fig.update_layout(template="plotly_white")
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(classes="tbl", border=0, index=False, float_format=lambda x: f"{x:.4g}")


def diagnostics_report(
    path: str | os.PathLike,
    *,
    shift: Any = None,
    sweep: Any = None,
    decomposition: pd.DataFrame | None = None,
    title: str = "Steering vs ablation diagnostics",
    note: str = "",
) -> Path:
    """Write ``path`` (HTML) from an :class:`AblationShift`, a :class:`SteeringSweep` (with
    its sign report) and a :func:`training_decomposition` table: any subset of them."""

    from caft_tl._html import document, plotly_script
    from caft_tl.diagnostics.decomposition import decomposition_figure, decomposition_table

    if shift is None and sweep is None and decomposition is None:
        raise ValueError("nothing to report: give shift, sweep and/or decomposition")
    parts = [f"<h1>{html.escape(title)}</h1>", _INTRO]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    if shift is not None:
        parts.append("<h2>1. Where ablation moves the model</h2>")
        parts.append(
            "<p><i>clean</i>: mean projection (or latent activation) without ablation; "
            "<i>upstream</i>: entering the direction's own hook with earlier hooks ablated; "
            "<i>ablated</i>: what the rest of the model sees; <i>change_sd</i>: the change in "
            "clean standard deviations.</p>"
        )
        parts.append(_fig(shift.figure()))
        cols = ["kind", "hook", "label", "clean", "upstream", "ablated", "change", "change_sd"]
        rows = shift.table[shift.table["kind"] != "sae"]
        parts.append(_table(rows[[c for c in cols if c in rows]]))
        if (shift.table["kind"] == "sae").any():
            parts.append("<p>SAE latents moved most:</p>")
            parts.append(_table(shift.top_latents(10)))
    if sweep is not None:
        parts.append("<h2>2. Ablation vs steering (no training)</h2>")
        parts.append(_fig(sweep.figure()))
        report = sweep.sign_report()
        parts.append("<h2>3. Sign report</h2><ul>")
        parts += [f"<li>{html.escape(s)}</li>" for s in sign_sentences(report)]
        parts.append("</ul>")
        parts.append(_table(report))
    if decomposition is not None:
        parts.append("<h2>4. Training decomposition</h2>")
        parts.append(_fig(decomposition_figure(decomposition)))
        table = decomposition_table(decomposition)
        parts.append(table.to_html(classes="tbl", border=0, float_format=lambda x: f"{x:.3f}"))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, document(title, "\n".join(parts), head=plotly_script()))
    return out
