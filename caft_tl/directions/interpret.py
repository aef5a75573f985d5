"""Interpreting concept directions: top examples, logit lens, HTML reports, hinted scores
and an LLM explainer.

Every function takes a ``ConceptSet`` and looks at each direction ``d`` (one row at one hook
point) through the projection ``h · d`` of activations ``h`` on it. Directions are used as
given (no normalisation), so for unit-norm rows the value is the scalar projection.

* :func:`top_examples` / :func:`shaded_examples`: the tokens (with context) that project
  most positively and most negatively on each direction.
* :func:`logit_lens`: the vocabulary tokens each direction promotes / suppresses directly.
* :func:`report_html`: one self-contained, offline HTML page per ConceptSet.
* :func:`hinted_scores` / :func:`select_by_hints`: "hinted" autointerp without an LLM; a
  direction is kept when it separates two contrast sets (e.g. male vs female sentences).
* :class:`LLMExplainer`: one-sentence explanations from any OpenAI-compatible endpoint,
  with retries and an on-disk cache.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from caft_tl._html import document
from caft_tl._http import ChatClient, HTTPGaveUp, HTTPRefused, default_cache
from caft_tl.activations import Activations, Positions, cache_activations, stop_layer
from caft_tl.directions.concepts import ConceptSet, data_fingerprint
from caft_tl.errors import InputIndexError

__all__ = [
    "ExplainerError",
    "LLMExplainer",
    "auroc",
    "build_prompt",
    "hinted_scores",
    "logit_lens",
    "report_html",
    "select_by_hints",
    "shaded_examples",
    "top_examples",
]

Window = tuple[int, int]
Reduce = Literal["mean", "max", "last"]
Side = Literal["top", "bottom"]
# How the example's own token is marked inside its decoded context string.
MARK = ("[[", "]]")


# --------------------------------------------------------------------------------------------
# Activations and projections
# --------------------------------------------------------------------------------------------


def _activations(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any,
    acts: Activations | None,
    positions: Positions,
    batch_size: int,
) -> Activations:
    """The caller's cached activations (checked to cover every hook), or a fresh cache."""
    if acts is None:
        if data is None:
            raise ValueError("pass data (texts / chats / a Dataset) or acts= (cached Activations)")
        return cache_activations(
            model, data, concepts.hooks, positions=positions, batch_size=batch_size,
            progress=False,
        )  # fmt: skip
    missing = [h for h in concepts.hooks if h not in acts]
    if missing:
        raise ValueError(f"acts lacks the ConceptSet's hooks {missing}; cached: {acts.hooks}")
    if len(acts) == 0:
        raise ValueError("acts holds no tokens")
    return acts


def _project(acts: Activations, concepts: ConceptSet, hook: str) -> Float[Tensor, "n k"]:
    """``h · d`` for every cached row and every direction at ``hook``, shard by shard so an
    on-disk cache never has to fit in memory at once."""
    d = concepts[hook].detach().to("cpu", torch.float32)
    parts = []
    for chunk in acts.iter_chunks(hook):
        if chunk.shape[-1] != d.shape[1]:
            raise ValueError(
                f"hook {hook!r}: activations are {chunk.shape[-1]} wide, directions {d.shape[1]}"
            )
        parts.append(chunk.to(torch.float32) @ d.T)
    return torch.cat(parts)


def _extreme_rows(
    values: Float[Tensor, " n"], k: int, side: Side, allowed: Tensor | None = None
) -> Int[Tensor, " m"]:
    """Row indices of the k largest (top) or smallest (bottom) values, most extreme first,
    among the ``allowed`` rows (all when None)."""
    if allowed is not None:
        values = values.masked_fill(~allowed, -math.inf if side == "top" else math.inf)
    k = min(k, len(values) if allowed is None else int(allowed.sum()))
    return torch.topk(values, k, largest=side == "top", sorted=True).indices


def _candidates(acts: Activations, skip_first: bool) -> Tensor | None:
    """Rows that may be shown. The first token of a sequence is an attention sink whose
    activation has an outlying norm, so it would top (or bottom) every direction."""
    if not skip_first:
        return None
    later = acts.rows.position > 0
    return later if later.any() else None  # single-token examples: nothing else to show


# --------------------------------------------------------------------------------------------
# Tokens as text
# --------------------------------------------------------------------------------------------


def _token_strs(model: HookedTransformer, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (a model without a tokenizer shows ``<id>``)."""
    tok = model.tokenizer
    if tok is None:
        return [f"<{int(i)}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def _text(model: HookedTransformer, ids: Sequence[int]) -> str:
    # Decoding a span at once keeps multi-byte characters split across tokens intact.
    tok = model.tokenizer
    if tok is None:
        return "".join(_token_strs(model, ids))
    return tok.decode([int(i) for i in ids])


def visible_text(s: str) -> str:
    # Newlines would break a one-line table cell or a shaded row; show them as a symbol.
    """``s`` with newlines shown as ``↵`` (one-line table cells, shaded rows)."""
    return s.replace("\n", "↵")


# --------------------------------------------------------------------------------------------
# Top examples
# --------------------------------------------------------------------------------------------


def example_record(
    model: HookedTransformer, acts: Activations, row: int, value: float, window: Window
) -> dict[str, Any]:
    """One top example as a dict: its value, example/position, and the text before, at
    and after the token within ``window``."""
    rows = acts.rows
    ids, at = acts.context(row, *window)
    before, token = _text(model, ids[:at]), _text(model, ids[at : at + 1])
    after = _text(model, ids[at + 1 :])
    return {
        "value": value,
        "example": int(rows.example[row]),
        "position": int(rows.position[row]),
        "row": row,
        "token_id": int(rows.token[row]),
        "token": token,
        "before": before,
        "after": after,
        "context": visible_text(f"{before}{MARK[0]}{token}{MARK[1]}{after}"),
    }


def _direction_examples(
    model: HookedTransformer,
    concepts: ConceptSet,
    acts: Activations,
    hook: str,
    proj: Float[Tensor, "n k"],
    k: int,
    window: Window,
    allowed: Tensor | None,
) -> list[dict[str, Any]]:
    records = []
    for index in range(proj.shape[1]):
        head = {"hook": hook, "index": index, "label": concepts.labels[hook][index]}
        for side in ("top", "bottom"):
            rows = _extreme_rows(proj[:, index], k, side, allowed).tolist()
            for rank, row in enumerate(rows):
                value = float(proj[row, index])
                record = example_record(model, acts, row, value, window)
                records.append({**head, "side": side, "rank": rank, **record})
    return records


def top_examples(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any = None,
    *,
    k: int = 10,
    window: Window = (12, 3),
    positions: Positions = "all",
    batch_size: int = 8,
    acts: Activations | None = None,
    skip_first: bool = True,
) -> pd.DataFrame:
    """The k most positive ("top") and k most negative ("bottom") tokens of each direction.

    Args:
        data: texts, chats, a JSONL path or a Dataset (see :mod:`caft_tl.data`); ignored when
            ``acts`` (activations already cached at the set's hooks) is given.
        window: tokens shown (before, after) the example's token.
        positions: which tokens are candidates when caching (``"all"``, ``"assistant"``,
            ``"last"``).
        skip_first: leave out each sequence's first token (BOS / attention sink, whose
            outlying activation would otherwise be the top or bottom example everywhere).

    Returns one row per example with columns ``hook, index, label, side, rank, value,
    example, position, row, token_id, token, before, after, context``; ``context`` is the
    decoded window with the token marked as ``[[token]]``; ``row`` indexes ``acts``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    acts = _activations(model, concepts, data, acts, positions, batch_size)
    allowed = _candidates(acts, skip_first)
    records = []
    for hook in concepts.hooks:
        proj = _project(acts, concepts, hook)
        records += _direction_examples(model, concepts, acts, hook, proj, k, window, allowed)
    return pd.DataFrame.from_records(records)


def _window_values(
    model: HookedTransformer,
    acts: Activations,
    proj: Float[Tensor, " n"],
    direction: Float[Tensor, " d"],
    hook: str,
    row: int,
    window: Window,
) -> tuple[list[int], list[float], int]:
    """Token ids of a row's context window, the projection at each of them, and where the
    row's token sits. Values come from the cache when every window token was cached (e.g.
    ``positions="all"``), else from one forward pass over the example's prefix."""
    ids, at = acts.context(row, *window)
    rows = acts.rows
    example, position = int(rows.example[row]), int(rows.position[row])
    start = position - at
    here = (rows.example == example).nonzero().flatten()
    by_position = dict(zip(rows.position[here].tolist(), here.tolist(), strict=True))
    wanted = range(start, start + len(ids))
    if all(p in by_position for p in wanted):
        return ids, [float(proj[by_position[p]]) for p in wanted], at
    return ids, _forward_window(model, acts.token_ids[example], hook, direction, wanted), at


def _forward_window(
    model: HookedTransformer,
    ids: list[int],
    hook: str,
    direction: Float[Tensor, " d"],
    wanted: range,
) -> list[float]:
    # Causal model: the prefix up to the window's end gives the same activations there as
    # the full example (which is how the cache saw it, right-padded).
    tokens = torch.tensor([ids[: wanted.stop]], device=model.cfg.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            tokens, names_filter=[hook], stop_at_layer=stop_layer([hook]),
            return_cache_object=False,
        )  # fmt: skip
    act = cache[hook][0]
    act = act.flatten(1) if act.ndim > 2 else act  # [pos, heads, d_head] hooks, per token
    values = act[wanted.start : wanted.stop].float().cpu() @ direction.float().cpu()
    return values.tolist()


def _shaded_windows(
    model: HookedTransformer,
    concepts: ConceptSet,
    acts: Activations,
    proj: Float[Tensor, "n k"],
    hook: str,
    index: int,
    rows: Sequence[int],
    window: Window,
) -> list[dict[str, Any]]:
    """Per example row: token strings, per-token projections and the marked token's place."""
    out = []
    for row in rows:
        ids, values, at = _window_values(
            model, acts, proj[:, index], concepts[hook][index], hook, int(row), window
        )
        tokens = [visible_text(t) for t in _token_strs(model, ids)]
        out.append({"tokens": tokens, "values": values, "at": at, "value": values[at]})
    return out


def _symmetric_scale(windows: list[dict[str, Any]]) -> float:
    # One colour scale per direction, symmetric around 0, so shades compare across examples;
    # set by the examples' own tokens (a context's first token, an attention sink, would
    # otherwise wash everything else out: it just saturates).
    top = max((abs(w["value"]) for w in windows), default=0.0)
    return top if top > 0 else 1.0


def shaded_examples(
    model: HookedTransformer,
    concepts: ConceptSet,
    hook: str,
    index: int,
    data: Any = None,
    *,
    acts: Activations | None = None,
    k: int = 5,
    side: Side = "top",
    window: Window = (12, 3),
    positions: Positions = "all",
    batch_size: int = 8,
    skip_first: bool = True,
) -> list[Any]:
    """circuitsvis ``colored_tokens`` objects for the ``side`` examples of one direction;
    each token of the context window is shaded by its projection on the direction.

    In a notebook they display themselves. ``obj.local_src`` is self-contained HTML (about
    1.3 MB each, the JavaScript bundle included); ``str(obj)`` loads it from a CDN. For a page
    with many examples use :func:`report_html`, which includes the bundle once.
    """
    from circuitsvis.tokens import colored_tokens

    if side not in ("top", "bottom"):
        raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")
    if not 0 <= index < concepts[hook].shape[0]:
        n = concepts[hook].shape[0]
        raise InputIndexError(f"hook {hook!r} has {n} directions, not {index}")
    sub = concepts.select({hook: [index]})
    acts = _activations(model, sub, data, acts, positions, batch_size)
    proj = _project(acts, concepts, hook)
    rows = _extreme_rows(proj[:, index], k, side, _candidates(acts, skip_first)).tolist()
    windows = _shaded_windows(model, concepts, acts, proj, hook, index, rows, window)
    scale = _symmetric_scale(windows)
    return [
        colored_tokens(w["tokens"], w["values"], min_value=-scale, max_value=scale) for w in windows
    ]


# --------------------------------------------------------------------------------------------
# Logit lens
# --------------------------------------------------------------------------------------------


def _to_residual(
    model: HookedTransformer, hook: str, d: Float[Tensor, "k w"]
) -> Float[Tensor, "k d_model"] | None:
    """Directions as residual-stream vectors: as they are for d_model-wide hooks, through
    ``W_out`` for ``mlp.hook_post`` and through ``W_O`` for ``attn.hook_z``; None otherwise."""
    cfg = model.cfg
    match = re.match(r"^blocks\.(\d+)\.(.+)$", hook)
    if match and match.group(2) in ("mlp.hook_post", "attn.hook_z"):
        block = model.blocks[int(match.group(1))]
        if match.group(2) == "mlp.hook_post" and d.shape[1] == cfg.d_mlp:
            return d @ block.mlp.W_out.detach().float()
        if match.group(2) == "attn.hook_z" and d.shape[1] == cfg.n_heads * cfg.d_head:
            per_head = d.reshape(d.shape[0], cfg.n_heads, cfg.d_head)
            return torch.einsum("khe,hed->kd", per_head, block.attn.W_O.detach().float())
    if d.shape[1] == cfg.d_model:
        return d
    return None


def _unembedded(
    model: HookedTransformer, resid: Float[Tensor, "k d_model"]
) -> Float[Tensor, "k vocab"]:
    """Direct logit effect of residual directions. The final norm is linearised: its
    per-channel weight is applied (and LayerNorm's centring), its input-dependent scale
    ``1/rms(x)`` is ignored, so logits are comparable within a direction only."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        resid = resid - resid.mean(-1, keepdim=True)  # LayerNorm removes the mean first
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    if weight is not None:
        resid = resid * weight.detach().float().to(resid.device)
    # b_U is left out: it is the same for every direction and says nothing about one.
    return resid @ model.W_U.detach().float().to(resid.device)


def logit_lens(model: HookedTransformer, concepts: ConceptSet, k: int = 10) -> pd.DataFrame:
    """Top / bottom vocabulary tokens of each direction through the unembedding.

    Computes ``(d * ln_final.w) @ W_U`` (LayerNorm models: ``d`` centred first). The final
    norm's input-dependent scale is ignored, so ``logit`` is a direction's *relative* direct
    effect. ``mlp.hook_post`` and ``attn.hook_z`` directions are first mapped to the residual
    stream through ``W_out`` / ``W_O``; other hooks whose width is not ``d_model`` are skipped
    with a warning.

    Returns columns ``hook, index, label, side, rank, token_id, token, logit``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    records = []
    for hook in concepts.hooks:
        d = concepts[hook].detach().to(model.W_U.device, torch.float32)
        resid = _to_residual(model, hook, d)
        if resid is None:
            warnings.warn(f"logit lens: skipping {hook!r} (width {d.shape[1]})", stacklevel=2)
            continue
        logits = _unembedded(model, resid).cpu()
        for index in range(d.shape[0]):
            head = {"hook": hook, "index": index, "label": concepts.labels[hook][index]}
            for side in ("top", "bottom"):
                ids = _extreme_rows(logits[index], k, side).tolist()
                for rank, (tid, s) in enumerate(zip(ids, _token_strs(model, ids), strict=True)):
                    records.append(
                        {**head, "side": side, "rank": rank, "token_id": tid, "token": s,
                         "logit": float(logits[index, tid])}
                    )  # fmt: skip
    columns = ["hook", "index", "label", "side", "rank", "token_id", "token", "logit"]
    return pd.DataFrame.from_records(records, columns=columns)


# --------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
section{border-top:1px solid #ccc;margin-top:1.5em;padding-top:.5em}
.meta{color:#666;font-size:.9em}.tok{white-space:pre;font-family:monospace;padding:0 1px}
.at{outline:2px solid #333}.ex{margin:.3em 0;line-height:1.8}.val{color:#666;font-size:.8em}
.lens span{font-family:monospace;background:#eee;margin:0 .2em;padding:0 .2em;white-space:pre}
.expl{background:#f6f6e8;padding:.4em}.cv{display:inline-block}
"""


def _bundle() -> str | None:
    """circuitsvis's self-contained JavaScript bundle, safe to inline (None if missing)."""
    try:
        import circuitsvis
    except ImportError:
        return None
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        return None
    js = path.read_text(encoding="utf-8")
    # "</script" would end the inline script early; "<\/script" means the same inside JS
    # strings. The source-map comment points to a file the page does not have.
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    return re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.MULTILINE)


def _shade(value: float, scale: float) -> str:
    # circuitsvis's default colours: red for negative, blue for positive.
    alpha = min(1.0, abs(value) / scale)
    rgb = "0,0,255" if value >= 0 else "255,0,0"
    return f"background:rgba({rgb},{alpha:.2f})"


def _inline_tokens(window: dict[str, Any], scale: float) -> str:
    """Plain HTML shading: works without JavaScript, and is replaced by circuitsvis when the
    bundle runs."""
    spans = []
    for i, (tok, v) in enumerate(zip(window["tokens"], window["values"], strict=True)):
        cls = "tok at" if i == window["at"] else "tok"
        spans.append(
            f'<span class="{cls}" style="{_shade(v, scale)}" title="{v:.3g}">'
            f"{html.escape(tok)}</span>"
        )
    return "".join(spans)


def _json_for_script(obj: Any) -> str:
    # Inside <script> only "</" can end the element; escaping "<" makes that impossible.
    return json.dumps(obj).replace("<", "\\u003c")


class _Page:
    """Collects the HTML body and the circuitsvis elements to render."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.elements: list[tuple[str, dict[str, Any]]] = []

    def shaded(self, window: dict[str, Any], scale: float) -> str:
        element = f"cv-{len(self.elements)}"
        props = {
            "tokens": window["tokens"],
            "values": window["values"],
            "minValue": -scale,
            "maxValue": scale,
        }
        self.elements.append((element, props))
        return (
            f'<div class="ex"><span class="val">{window["value"]:+.3f}</span> '
            f'<div class="cv" id="{element}">{_inline_tokens(window, scale)}</div></div>'
        )


def _lens_html(lens: pd.DataFrame, hook: str, index: int) -> str:
    if lens.empty:
        return ""
    mine = lens[(lens["hook"] == hook) & (lens["index"] == index)]
    if mine.empty:
        return ""
    out = []
    for side, word in (("top", "promotes"), ("bottom", "suppresses")):
        toks = mine[mine["side"] == side].sort_values("rank")["token"]
        spans = "".join(f"<span>{html.escape(visible_text(t))}</span>" for t in toks)
        out.append(f'<p class="lens">Logit lens {word}: {spans}</p>')
    return "".join(out)


def _direction_html(
    page: _Page,
    concepts: ConceptSet,
    hook: str,
    index: int,
    windows: dict[str, list[dict[str, Any]]],
    lens: pd.DataFrame,
    explanation: str | None,
) -> str:
    label = html.escape(concepts.labels[hook][index])
    score = concepts.scores[hook][index]
    score_txt = "" if math.isnan(score) else f" · score {score:.4g}"
    scale = _symmetric_scale(windows["top"] + windows["bottom"])
    parts = [
        f'<section id="{html.escape(hook)}-{index}"><h2>{label}</h2>',
        f'<p class="meta">{html.escape(hook)} · direction {index}{score_txt}</p>',
    ]
    if explanation:
        parts.append(f'<p class="expl">{html.escape(explanation)}</p>')
    parts.append(_lens_html(lens, hook, index))
    for side, title in (("top", "Most positive"), ("bottom", "Most negative")):
        parts.append(f"<h3>{title}</h3>")
        parts += [page.shaded(w, scale) for w in windows[side]]
    parts.append("</section>")
    return "\n".join(parts)


def _render_script(elements: list[tuple[str, dict[str, Any]]]) -> str:
    # One JSON blob and one loop: the bundle is included once and reused for every element.
    return (
        f'<script type="application/json" id="cv-props">{_json_for_script(elements)}</script>\n'
        "<script>(function(){if(typeof CircuitsVis==='undefined')return;"
        "var items=JSON.parse(document.getElementById('cv-props').textContent);"
        "items.forEach(function(it){try{var el=document.getElementById(it[0]);el.innerHTML='';"
        "CircuitsVis.render(it[0],CircuitsVis.ColoredTokens,it[1]);}"
        "catch(e){console.error(e);}});})();</script>"
    )


def _sections(
    model, concepts, data, acts, k, window, positions, batch_size, lens_k, explanations, skip_first
) -> tuple[Activations, _Page, list[str]]:
    """One HTML section per direction (and the activations and page they came from)."""
    acts = _activations(model, concepts, data, acts, positions, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped hooks simply show no logit lens
        lens = logit_lens(model, concepts, k=lens_k)
    page, sections, allowed = _Page(), [], _candidates(acts, skip_first)
    for hook in concepts.hooks:
        proj = _project(acts, concepts, hook)
        for index in range(proj.shape[1]):
            windows = {}
            for side in ("top", "bottom"):
                rows = _extreme_rows(proj[:, index], k, side, allowed).tolist()
                windows[side] = _shaded_windows(
                    model, concepts, acts, proj, hook, index, rows, window
                )
            note = (explanations or {}).get((hook, index))
            sections.append(_direction_html(page, concepts, hook, index, windows, lens, note))
    return acts, page, sections


def report_html(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any,
    path: str | os.PathLike,
    *,
    k: int = 8,
    acts: Activations | None = None,
    title: str | None = None,
    window: Window = (12, 3),
    positions: Positions = "all",
    batch_size: int = 8,
    lens_k: int = 10,
    explanations: Mapping[tuple[str, int], str] | None = None,
    bundle: bool = True,
    skip_first: bool = True,
) -> Path:
    """Write one self-contained HTML page for a ConceptSet and return its path.

    Per direction: label, hook, score, optional explanation (from :class:`LLMExplainer`),
    logit-lens tokens and the k most positive / negative examples with every context token
    shaded by its projection. The page needs no network: tokens are shaded with inline
    styles, and with ``bundle=True`` the circuitsvis JavaScript (about 1.3 MB) is included
    once and renders each example as an interactive ``ColoredTokens`` element.
    """
    acts, page, sections = _sections(
        model, concepts, data, acts, k, window, positions, batch_size, lens_k, explanations,
        skip_first,
    )  # fmt: skip
    js = _bundle() if bundle else None
    if bundle and js is None:
        warnings.warn("circuitsvis bundle not found: the report uses plain shading", stacklevel=2)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page_html(concepts, title, acts, sections, page, js), encoding="utf-8")
    return out


def directions_html(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any,
    *,
    k: int = 6,
    acts: Activations | None = None,
    window: Window = (12, 3),
    positions: Positions = "all",
    batch_size: int = 8,
    lens_k: int = 10,
    explanations: Mapping[tuple[str, int], str] | None = None,
    skip_first: bool = True,
) -> str:
    """The per-direction sections of :func:`report_html` (logit lens and shaded top / bottom
    examples) as an HTML fragment with its own ``<style>``, for embedding in a larger
    report. Tokens are shaded with inline styles only: no script, no network."""
    _, _, sections = _sections(
        model, concepts, data, acts, k, window, positions, batch_size, lens_k, explanations,
        skip_first,
    )  # fmt: skip
    return f"<style>{_CSS}</style>\n" + "\n".join(sections)


def _page_html(
    concepts: ConceptSet,
    title: str | None,
    acts: Activations,
    sections: list[str],
    page: _Page,
    js: str | None,
) -> str:
    title = title or f"ConceptSet: {concepts.provenance.get('method') or 'directions'}"
    provenance = html.escape(json.dumps(concepts.provenance, indent=2, default=str))
    scripts = "" if js is None else f"<script>{js}</script>\n{_render_script(page.elements)}"
    body = (
        f"<h1>{html.escape(title)}</h1>\n"
        f'<p class="meta">{html.escape(repr(concepts))}; examples from {len(acts)} tokens '
        f"of {acts.meta.get('n_examples', '?')} examples. Blue: positive projection, red: "
        "negative; the outlined token is the example.</p>\n"
        f"<details><summary>Provenance</summary><pre>{provenance}</pre></details>\n"
        + "\n".join(sections)
        + f"\n{scripts}"
    )
    return document(title, body, css=_CSS)


# --------------------------------------------------------------------------------------------
# Hinted scores (offline autointerp from contrast sets)
# --------------------------------------------------------------------------------------------


def _midranks(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def auroc(positive: Sequence[float] | Tensor, negative: Sequence[float] | Tensor) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie): the Mann-Whitney U statistic
    divided by ``n_pos * n_neg``, with midranks for ties. 1.0: positives all score higher."""
    pos = torch.as_tensor(positive, dtype=torch.float64).flatten().cpu()
    neg = torch.as_tensor(negative, dtype=torch.float64).flatten().cpu()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs both classes (got {len(pos)} positive, {len(neg)} negative)")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("AUROC scores contain NaN or inf")
    ranks = _midranks(torch.cat([pos, neg]))
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _reduce_per_example(
    proj: Float[Tensor, "n k"], example: Int[Tensor, " n"], position: Int[Tensor, " n"],
    n_examples: int, reduce: Reduce,
) -> Float[Tensor, "m k"]:  # fmt: skip
    """Per-example projection (mean / max over its tokens, or its last token); examples
    with no cached token (e.g. no assistant turn) are dropped."""
    counts = torch.bincount(example, minlength=n_examples)
    index = example[:, None].expand_as(proj)
    if reduce == "mean":
        out = torch.zeros(n_examples, proj.shape[1]).index_add_(0, example, proj)
        out = out / counts.clamp(min=1)[:, None]
    elif reduce == "max":
        out = torch.full((n_examples, proj.shape[1]), -math.inf)
        out = out.scatter_reduce(0, index, proj, "amax")
    elif reduce == "last":
        last = torch.full((n_examples,), -1).scatter_reduce(0, example, position, "amax")
        is_last = position == last[example]
        out = torch.zeros(n_examples, proj.shape[1])
        out[example[is_last]] = proj[is_last]
    else:
        raise ValueError(f"reduce must be 'mean', 'max' or 'last', got {reduce!r}")
    return out[counts > 0]


def _example_scores(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any,
    positions: Positions,
    reduce: Reduce,
    batch_size: int,
    skip_first: bool,
) -> dict[str, Float[Tensor, "m k"]]:
    acts = cache_activations(
        model, data, concepts.hooks, positions=positions, batch_size=batch_size, progress=False
    )
    rows, n = acts.rows, int(acts.meta["n_examples"])
    # The first token (identical in every example, with an outlying norm) would set every
    # example's max and bias means by length; leave it out.
    keep = rows.position > 0 if skip_first else torch.ones(len(rows), dtype=torch.bool)
    out = {}
    for hook in concepts.hooks:
        proj = _project(acts, concepts, hook)[keep]
        out[hook] = _reduce_per_example(proj, rows.example[keep], rows.position[keep], n, reduce)
    return out


def hinted_scores(
    model: HookedTransformer,
    concepts: ConceptSet,
    positive: Any,
    negative: Any,
    *,
    positions: Positions = "all",
    reduce: Reduce = "mean",
    batch_size: int = 8,
    skip_first: bool = True,
    paired: bool = False,
) -> pd.DataFrame:
    """How well each direction separates two contrast sets (hinted autointerp, offline).

    ``positive`` / ``negative``: texts or chats (anything :mod:`caft_tl.data` accepts), e.g.
    sentences about men vs women. Each example's projections on a direction are reduced to
    one number (``"mean"`` / ``"max"`` over its ``positions`` tokens, or its ``"last"``),
    and the AUROC of positive vs negative examples is reported. ``skip_first`` leaves each
    sequence's first token out (examples left without tokens are dropped).

    ``paired=True`` is for matched pairs (``positive[i]`` and ``negative[i]`` differ only
    in the concept, e.g. "She ..." / "He ..."): the "auroc" is then the share of pairs whose
    positive example projects higher (ties count half). Everything the two sentences
    share cancels within a pair, so a concept carried by one or two tokens of a sentence
    still shows, where the unpaired AUROC of per-sentence means is swamped by how much
    sentences differ from each other.

    Returns columns ``hook, index, label, auroc, separation (|auroc - 0.5|), sign (+1 when
    positives project higher, -1 lower, 0 neither), mean_positive, mean_negative,
    n_positive, n_negative, positions, reduce, positive_data, negative_data`` (the last two
    are fingerprints of the contrast sets, recorded by :func:`select_by_hints`).
    """
    if reduce not in ("mean", "max", "last"):
        raise ValueError(f"reduce must be 'mean', 'max' or 'last', got {reduce!r}")
    pos = _example_scores(model, concepts, positive, positions, reduce, batch_size, skip_first)
    neg = _example_scores(model, concepts, negative, positions, reduce, batch_size, skip_first)
    if paired:
        _check_pairs(pos, neg)
    common = {
        "positions": positions, "reduce": reduce, "paired": paired,
        "positive_data": data_fingerprint(positive), "negative_data": data_fingerprint(negative),
    }  # fmt: skip
    records = []
    for hook in concepts.hooks:
        for index in range(concepts[hook].shape[0]):
            p, q = pos[hook][:, index], neg[hook][:, index]
            a = paired_auroc(p, q) if paired else auroc(p, q)
            records.append(
                {
                    "hook": hook, "index": index, "label": concepts.labels[hook][index],
                    "auroc": a, "separation": abs(a - 0.5),
                    "sign": 1 if a > 0.5 else -1 if a < 0.5 else 0,
                    "mean_positive": float(p.mean()), "mean_negative": float(q.mean()),
                    "n_positive": len(p), "n_negative": len(q), **common,
                }
            )  # fmt: skip
    return pd.DataFrame.from_records(records)


def _check_pairs(pos: dict[str, Tensor], neg: dict[str, Tensor]) -> None:
    n_pos, n_neg = (len(next(iter(d.values()))) for d in (pos, neg))
    if n_pos != n_neg:
        raise ValueError(
            f"paired=True needs matched pairs: {n_pos} positive vs {n_neg} negative examples "
            "(with tokens)"
        )


def paired_auroc(positive: Tensor, negative: Tensor) -> float:
    """Share of pairs ``i`` with ``positive[i] > negative[i]`` (ties count half): the AUROC
    of a matched-pairs design (0.5 = no separation)."""
    if positive.shape != negative.shape or positive.numel() == 0:
        raise ValueError("paired_auroc needs two non-empty tensors of the same shape")
    wins = (positive > negative).double() + 0.5 * (positive == negative).double()
    return float(wins.mean())


def _hint_label(label: str, a: float) -> str:
    return f"{label} ({'+' if a >= 0.5 else '-'}hint, auroc {a:.2f})"


def select_by_hints(
    concepts: ConceptSet,
    scores: pd.DataFrame,
    *,
    min_auroc: float = 0.8,
    max_per_hook: int | None = None,
) -> ConceptSet:
    """Keep directions whose AUROC or 1 - AUROC reaches ``min_auroc`` (either sign separates).

    ``scores`` comes from :func:`hinted_scores` on the same set. With ``max_per_hook`` the
    best-separating directions are kept; kept rows stay in their original order. Labels
    become e.g. ``"PC3 (+hint, auroc 0.91)"`` ("-" when the negative set projects higher);
    the provenance history records the threshold, the AUROCs and the contrast sets'
    fingerprints.
    """
    if not 0.5 <= min_auroc <= 1.0:
        raise ValueError(f"min_auroc must be in [0.5, 1], got {min_auroc}")
    table = _check_scores(concepts, scores)
    strong = table[table["separation"] >= min_auroc - 0.5 - 1e-12]
    selection: dict[str, list[int]] = {}
    for hook in concepts.hooks:
        mine = strong[strong["hook"] == hook].sort_values(
            ["separation", "index"], ascending=[False, True]
        )
        keep = sorted(mine["index"].astype(int).tolist()[:max_per_hook])
        if keep:
            selection[hook] = keep
    if not selection:
        best = table.loc[table["separation"].idxmax()]
        raise ValueError(
            f"no direction reaches AUROC {min_auroc} either way; the best is "
            f"{best['hook']} #{best['index']} with AUROC {best['auroc']:.3f}"
        )
    return _hinted_set(concepts, table, selection, min_auroc, max_per_hook)


def _check_scores(concepts: ConceptSet, scores: pd.DataFrame) -> pd.DataFrame:
    needed = {"hook", "index", "auroc", "separation"}
    if not needed <= set(scores.columns):
        raise ValueError(f"scores lacks columns {sorted(needed - set(scores.columns))}")
    for hook, index in zip(scores["hook"], scores["index"], strict=True):
        if hook not in concepts or not 0 <= int(index) < concepts[hook].shape[0]:
            raise ValueError(f"scores name direction {hook!r} #{index}, not in this ConceptSet")
    return scores


def _hinted_set(
    concepts: ConceptSet,
    table: pd.DataFrame,
    selection: dict[str, list[int]],
    min_auroc: float,
    max_per_hook: int | None,
) -> ConceptSet:
    picked = concepts.select(selection)
    lookup = {
        (h, int(i)): float(a)
        for h, i, a in zip(table.hook, table["index"], table.auroc, strict=True)
    }
    labels = {
        hook: [_hint_label(picked.labels[hook][j], lookup[(hook, i)]) for j, i in enumerate(idx)]
        for hook, idx in selection.items()
    }

    def column(name: str) -> list[Any]:
        return sorted(set(table[name])) if name in table.columns else []

    step = {
        "op": "select_by_hints",
        "selection": selection,
        "min_auroc": min_auroc,
        "max_per_hook": max_per_hook,
        "auroc": {h: [lookup[(h, i)] for i in idx] for h, idx in selection.items()},
        "positive_data": column("positive_data"),
        "negative_data": column("negative_data"),
        "positions": column("positions"),
        "reduce": column("reduce"),
    }
    provenance = dict(concepts.provenance)
    provenance["history"] = [*concepts.provenance.get("history", []), step]
    return ConceptSet(picked.directions, labels, picked.scores, provenance)


# --------------------------------------------------------------------------------------------
# LLM explainer (any OpenAI-compatible chat endpoint)
# --------------------------------------------------------------------------------------------

DEFAULT_BASE_URL = "https://api.openai.com/v1"
SYSTEM_PROMPT = (
    "You are an interpretability researcher. You are shown text snippets where a direction "
    "in a language model's activations is most positive and most negative (the token in "
    "question is marked [[like this]], with the projection value), and the vocabulary tokens "
    "the direction promotes and suppresses. Reply with one short sentence naming the concept "
    "the direction represents. If nothing is coherent, say so."
)


class ExplainerError(RuntimeError):
    """The explainer endpoint failed or answered something unusable."""


class LLMExplainer:
    """Explain directions with an LLM behind an OpenAI-compatible ``/chat/completions``.

    ``base_url`` / ``model`` default to ``$CAFT_TL_EXPLAINER_BASE_URL`` (else OpenAI's URL)
    and ``$CAFT_TL_EXPLAINER_MODEL``; the API key is read from ``$<api_key_env>`` (no
    Authorization header when it is unset, as local servers need none). Requests go through
    the same client as :class:`caft_tl.evals.HTTPJudge`, with the same setting names: 429,
    5xx, timeouts and dropped connections are retried ``max_retries`` times with
    exponential backoff (``backoff * 2**i`` seconds, at most ``max_backoff``, jittered) or
    the server's longer Retry-After; other failures raise :class:`ExplainerError` at once.
    Answers are cached in ``cache``, an SQLite file (default: ``explainer-cache.sqlite`` in
    the caft-tl user cache; ``None``: no cache), keyed by the URL and the request, so a
    rerun makes no requests. ``requests`` counts the HTTP requests sent.
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30,
        max_retries: int = 3,
        cache: str | os.PathLike | None = "default",
        *,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        requests_per_minute: float | None = None,
        temperature: float = 0.0,
        max_tokens: int = 200,
    ) -> None:
        self.base_url = (
            base_url or os.environ.get("CAFT_TL_EXPLAINER_BASE_URL") or DEFAULT_BASE_URL
        ).rstrip("/")
        self.model = model or os.environ.get("CAFT_TL_EXPLAINER_MODEL")
        self.temperature, self.max_tokens = temperature, max_tokens
        if cache == "default":
            cache = default_cache("explainer-cache.sqlite")
        self.client = ChatClient(
            self.base_url, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
            backoff=backoff, max_backoff=max_backoff, requests_per_minute=requests_per_minute,
            cache=cache,
        )  # fmt: skip

    @property
    def requests(self) -> int:
        """HTTP requests sent by this explainer (retries included; cache hits send none)."""
        return self.client.requests

    def __repr__(self) -> str:
        return f"LLMExplainer(base_url={self.base_url!r}, model={self.model!r})"

    def explain(
        self,
        top_examples_df: pd.DataFrame,
        logit_lens_df: pd.DataFrame | None = None,
        *,
        max_examples: int = 10,
    ) -> dict[tuple[str, int], str]:
        """One explanation per direction in ``top_examples_df`` (from :func:`top_examples`),
        keyed by ``(hook, index)``; logit-lens tokens are added to the prompt when given."""
        if top_examples_df.empty:
            return {}
        keys = top_examples_df[["hook", "index"]].drop_duplicates().itertuples(index=False)
        out = {}
        for hook, index in keys:
            prompt = build_prompt(
                top_examples_df, logit_lens_df, hook, int(index), max_examples=max_examples
            )
            out[(hook, int(index))] = self.complete(prompt)
        return out

    def complete(self, prompt: str) -> str:
        """The model's answer to ``prompt`` (with :data:`SYSTEM_PROMPT`), cached."""
        if not self.model:
            raise ExplainerError("no explainer model: pass model= or set CAFT_TL_EXPLAINER_MODEL")
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        try:
            return self.client.post(body, parse=lambda reply: _answer(reply, self.client.url))
        except (HTTPRefused, HTTPGaveUp) as exc:
            raise ExplainerError(str(exc)) from None


def _answer(reply: Any, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ExplainerError(f"{url} sent no chat completion: {json.dumps(reply)[:300]}") from None
    if not isinstance(content, str):
        raise ExplainerError(f"{url} sent a non-text answer: {content!r}")
    return content.strip()


def build_prompt(
    top_examples_df: pd.DataFrame,
    logit_lens_df: pd.DataFrame | None,
    hook: str,
    index: int,
    *,
    max_examples: int = 10,
) -> str:
    """The user prompt for one direction: its top and bottom contexts and logit-lens tokens."""
    mine = top_examples_df[(top_examples_df["hook"] == hook) & (top_examples_df["index"] == index)]
    lines = [f"Direction {index} at hook {hook}."]
    for side, title in (("top", "Most positive"), ("bottom", "Most negative")):
        rows = mine[mine["side"] == side].sort_values("rank").head(max_examples)
        if len(rows):
            lines.append(f"\n{title} contexts:")
            lines += [f"{v:+.3f}: {c}" for v, c in zip(rows["value"], rows["context"], strict=True)]
    if logit_lens_df is not None and not logit_lens_df.empty:
        lens = logit_lens_df[(logit_lens_df["hook"] == hook) & (logit_lens_df["index"] == index)]
        for side, word in (("top", "promotes"), ("bottom", "suppresses")):
            toks = lens[lens["side"] == side].sort_values("rank")["token"].tolist()
            if toks:
                lines.append(f"\nLogit lens {word}: " + ", ".join(repr(t) for t in toks))
    lines.append("\nWhat concept does this direction represent?")
    return "\n".join(lines)
