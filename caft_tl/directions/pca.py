"""Principal components of activation differences, in one streaming pass over the shards.

CAFT's PCA route takes the top principal components of fine-tuned minus base activations
and ablates them. The reference implementation holds every token in memory and calls
``torch.svd_lowrank``; here each hook's row count, row sum and ``d x d`` second-moment
matrix are accumulated shard by shard, so memory depends on the width ``d`` only (never on
the number of tokens), and the result is an exact eigendecomposition, not a randomised
approximation.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from caft_tl.activations import ActivationDiff, Activations
from caft_tl.directions.concepts import ConceptSet, data_fingerprint, make_provenance

__all__ = ["explained_variance_figure", "pca"]

# Rows converted to the accumulation dtype at a time: bounds the temporary float64 copy
# (4096 x 576 x 8 bytes = 19 MiB) even when one in-memory chunk holds every token.
BLOCK_ROWS = 4096
# A component whose projection of the mean difference is below this fraction of the rows'
# RMS norm has no meaningful direction "towards the fine-tune": fall back to another rule.
SIGN_RTOL = 1e-6

# Activations metadata worth keeping in the provenance (where the differences came from).
_SOURCE_KEYS = ("path", "kind", "finetuned", "positions", "n_examples")

DiffSource = Activations | ActivationDiff | str | os.PathLike | Mapping[str, Tensor]


class _Moments:
    """Running count, sum and second-moment matrix of the rows of one hook.

    When centring, rows are shifted by the first block's mean before accumulating: the
    covariance is then ``(S - n m m^T) / (n - 1)`` with ``m`` the mean of the *shifted* rows,
    which is small, so no two large nearly equal matrices are subtracted (the textbook
    ``E[x x^T] - mu mu^T`` loses every digit when the mean is large against the spread).
    """

    def __init__(self, width: int, dtype: torch.dtype, center: bool) -> None:
        self.center = center
        self.n = 0
        self.shift: Float[Tensor, " d"] | None = None
        self.total: Float[Tensor, " d"] = torch.zeros(width, dtype=dtype)
        self.second: Float[Tensor, "d d"] = torch.zeros(width, width, dtype=dtype)

    def add(self, rows: Float[Tensor, "m d"]) -> bool:
        """Add a block of rows (modified in place: pass a copy). Returns False when the
        block holds NaN or inf: they propagate into its column sums, so checking those
        costs nothing, unlike a separate pass over every value."""
        if self.shift is None:
            self.shift = rows.mean(0) if self.center else torch.zeros_like(self.total)
        rows -= self.shift
        block_sum = rows.sum(0)
        if not torch.isfinite(block_sum).all():
            return False
        self.total += block_sum
        self.second.addmm_(rows.T, rows)
        self.n += rows.shape[0]
        return True

    @property
    def mean(self) -> Float[Tensor, " d"]:
        assert self.shift is not None
        return self.shift + self.total / self.n

    def covariance(self) -> Float[Tensor, "d d"]:
        """Sample covariance (``n - 1``) when centring, else the mean second moment."""
        if not self.center:
            cov = self.second / self.n
        else:
            m = self.total / self.n
            cov = (self.second - self.n * torch.outer(m, m)) / (self.n - 1)
        return (cov + cov.T) / 2  # exact symmetry for eigh, whatever the rounding


# ---------------------------------------------------------------------------- inputs


def _open(diff: DiffSource) -> Activations | dict[str, Tensor]:
    if isinstance(diff, ActivationDiff):
        return diff.diff
    if isinstance(diff, Activations):
        return diff
    if isinstance(diff, (str, os.PathLike)):
        return Activations.load(diff)
    if isinstance(diff, Mapping):
        out = {}
        for hook, value in diff.items():
            if not isinstance(value, Tensor) or value.ndim != 2:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"hook {hook!r}: expected a 2-D [n_tokens, d] tensor, got {shape}")
            out[str(hook)] = value
        if not out:
            raise ValueError("the dict of activations is empty")
        return out
    raise TypeError(
        "pca() takes Activations (e.g. from activation_diff), a folder written by "
        f"cache_activations/activation_diff, or a dict {{hook: Tensor[n, d]}}; got {type(diff)}"
    )


def _select_hooks(available: list[str], hooks: Sequence[str] | str | None) -> list[str]:
    if hooks is None:
        return list(available)
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise ValueError(f"no hooks given; available: {available}")
    unknown = [h for h in hooks if h not in available]
    if unknown:
        raise ValueError(f"unknown hooks {unknown}; available: {available}")
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hook names repeat: {hooks}")
    return hooks


def _chunks(
    src: Activations | dict[str, Tensor], hook: str, assistant_only: bool, skip_first: bool
) -> Iterator[Float[Tensor, "n d"]]:
    """The hook's rows chunk by chunk, restricted to assistant tokens / later positions."""
    if isinstance(src, dict):
        yield src[hook]
        return
    if not (assistant_only or skip_first):
        yield from src.iter_chunks(hook)
        return
    # Row metadata is stored per shard beside the activations: filter shard by shard.
    columns = zip(
        src.iter_chunks(hook),
        src.iter_chunks("_target"),
        src.iter_chunks("_position"),
        strict=True,
    )
    for rows, target, position in columns:
        keep = torch.ones_like(target, dtype=torch.bool)
        if assistant_only:
            keep &= target == 1
        if skip_first:
            keep &= position > 0
        yield rows[keep]


def _n_rows(src: Activations | dict[str, Tensor], hook: str) -> int:
    return src[hook].shape[0] if isinstance(src, dict) else len(src)


def _check_k(k: int) -> int:
    try:  # operator.index accepts numpy and torch integers, not floats
        value = operator.index(k)
    except TypeError:
        value = None
    if value is None or isinstance(k, bool):
        raise TypeError(f"k must be an integer, got {k!r}")
    if value < 1:
        raise ValueError(f"k must be at least 1, got {value}")
    return value


# ------------------------------------------------------------------------- computation


def _accumulate(
    blocks: Iterator[Tensor], hook: str, k: int, dtype: torch.dtype, center: bool, bar: Any
) -> _Moments | None:
    moments: _Moments | None = None
    for chunk in blocks:
        bar.update(chunk.shape[0])
        for start in range(0, chunk.shape[0], BLOCK_ROWS):
            # A copy in the accumulation dtype, which add() may shift in place.
            block = chunk[start : start + BLOCK_ROWS].to(dtype, copy=True)
            if moments is None:
                # Checked at the first block, not after streaming every shard.
                if k > block.shape[1]:
                    raise ValueError(
                        f"hook {hook!r}: k={k} exceeds the activation width d={block.shape[1]}"
                    )
                moments = _Moments(block.shape[1], dtype, center)
            first_row = moments.n
            if not moments.add(block):
                raise ValueError(
                    f"hook {hook!r}: the activations contain NaN or inf (in rows "
                    f"{first_row}..{first_row + len(block) - 1} of those used); check the "
                    "models' dtypes"
                )
            del block  # before the next copy exists, not after: one block alive at a time
        # Drop this shard before the generator reads the next one, or two are held at once.
        del chunk
    return moments


def _orient(
    components: Float[Tensor, "k d"], mean: Float[Tensor, " d"], scale: float
) -> Float[Tensor, "k d"]:
    """Flip each row so the mean difference projects positively onto it; where that
    projection is ~0, make the row's largest-magnitude entry positive instead."""
    proj = components @ mean
    top = components.abs().argmax(dim=1)  # first index among ties: deterministic
    fallback = torch.sign(components[torch.arange(len(components)), top])
    sign = torch.where(proj.abs() > SIGN_RTOL * scale, torch.sign(proj), fallback)
    return components * sign[:, None]


def _hook_pca(moments: _Moments, k: int, hook: str) -> dict[str, Any]:
    cov = moments.covariance()
    total = float(cov.trace())
    if not total > 0:
        raise ValueError(
            f"hook {hook!r}: the differences have zero variance (all rows equal); are the "
            "two models identical?"
        )
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values = values.flip(0)[:k].clamp_min(0)  # rounding can make null eigenvalues < 0
    components = vectors.flip(1)[:, :k].T.contiguous()
    mean = moments.mean
    scale = math.sqrt(total + float(mean @ mean))  # RMS row norm (centred case)
    return {
        "directions": _orient(components, mean, scale),
        "variance": values.tolist(),
        "ratio": (values / total).tolist(),
        "total": total,
        "mean_norm": float(mean.norm()),
        "n": moments.n,
    }


def _fit_hook(
    src: Activations | dict[str, Tensor],
    hook: str,
    k: int,
    *,
    assistant_only: bool,
    skip_first: bool,
    center: bool,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, Any]:
    with tqdm(
        total=_n_rows(src, hook), desc=f"PCA {hook}", unit="tok", disable=not progress
    ) as bar:
        rows = _chunks(src, hook, assistant_only, skip_first)
        moments = _accumulate(rows, hook, k, dtype, center, bar)
    n = 0 if moments is None else moments.n
    if n == 0 and assistant_only:
        raise ValueError(
            f"hook {hook!r}: no rows with target == 1 (assistant tokens) to keep; was the "
            "cache made from chat data with assistant turns?"
        )
    if n < 2:
        where = " after keeping assistant tokens" if assistant_only else ""
        raise ValueError(f"hook {hook!r}: PCA needs at least 2 rows{where}, got {n}")
    assert moments is not None
    rank = n - 1 if center else n
    if k > rank:
        warnings.warn(
            f"hook {hook!r}: k={k} but only {n} rows: components beyond {rank} carry no "
            "variance and their directions are arbitrary",
            stacklevel=3,
        )
    return _hook_pca(moments, k, hook)


def _fingerprint(src: Activations | dict[str, Tensor]) -> str | None:
    if isinstance(src, dict):
        return None
    return data_fingerprint(_token_blocks(src.token_ids))


def _token_blocks(token_ids: list[list[int]], per_block: int = 4096) -> Iterator[Tensor]:
    # Tensors hash in microseconds where nested lists go element by element; blocks of
    # examples keep the temporary copy small however many tokens there are.
    for start in range(0, len(token_ids), per_block):
        examples = token_ids[start : start + per_block]
        yield torch.tensor([len(ids) for ids in examples], dtype=torch.long)
        yield torch.tensor([t for ids in examples for t in ids], dtype=torch.long)


def pca(
    diff: DiffSource,
    k: int = 20,
    *,
    hooks: Sequence[str] | str | None = None,
    assistant_only: bool = False,
    skip_first: bool = True,
    center: bool = True,
    model: Any = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> ConceptSet:
    """Top-``k`` principal components of activation differences at each hook.

    Streams over the shards of ``diff`` once per hook, accumulating the row count, row sum
    and the ``d x d`` second-moment matrix in ``dtype``, then runs ``torch.linalg.eigh``;
    memory is ``O(d^2)`` plus one shard, whatever the number of tokens.

    Args:
        diff: typically ``activation_diff(base, finetuned, ...)`` (fine-tuned minus base):
            in-memory or on-disk :class:`~caft_tl.Activations`, an ``ActivationDiff``, a
            folder written with ``out=``, or a dict ``{hook: Tensor[n, d]}``.
        k: components per hook (1 <= k <= d).
        hooks: hooks to analyse (default: every hook in ``diff``).
        assistant_only: keep only rows whose ``rows.target == 1`` (assistant tokens of chat
            data), as CAFT does; needs Activations, not a dict.
        skip_first: drop each example's first token (Activations only; dicts are used as
            given). Its residual stream is an attention sink with a norm far above other
            tokens', so its difference alone can take most of the variance (92% of PC0 in
            one run on the embedded model).
        center: subtract the mean difference first (PCA of the covariance). ``False`` gives
            the top directions of the uncentred second moment.
        model: recorded in the provenance (default: ``diff.meta["model"]``).
        dtype: accumulation and eigendecomposition dtype; also the directions' dtype.

    Returns:
        A ConceptSet with ``k`` orthonormal rows per hook labelled ``"PC0"..``, highest
        variance first; ``scores`` are explained-variance ratios (component variance over
        total variance, so they sum to at most 1). The provenance records ``k``, ``center``,
        ``assistant_only``, tokens used, the explained and total variance and the norm of the
        mean difference per hook.

    Sign convention:
        Each component is oriented so that the mean difference projects positively onto it:
        fine-tuning moves activations towards ``+PC`` on average. Where that projection is
        ~0 (below ``SIGN_RTOL`` times the rows' RMS norm), the component's
        largest-magnitude entry is made positive instead (first index on ties). Results
        are deterministic.
    """
    k = _check_k(k)
    src = _open(diff)
    available = list(src) if isinstance(src, dict) else src.hooks
    selected = _select_hooks(available, hooks)
    if assistant_only and isinstance(src, dict):
        raise ValueError(
            "assistant_only=True needs row targets: pass Activations (from cache_activations "
            "or activation_diff), or filter the tensors yourself"
        )
    # The fit's settings, which the provenance records as they were.
    opts = {"assistant_only": assistant_only, "skip_first": skip_first, "center": center}
    fits = {
        hook: _fit_hook(src, hook, k, **opts, dtype=dtype, progress=progress) for hook in selected
    }
    return ConceptSet(
        {h: f["directions"] for h, f in fits.items()},
        labels={h: [f"PC{i}" for i in range(k)] for h in fits},
        scores={h: f["ratio"] for h, f in fits.items()},
        provenance=_provenance(src, fits, model, k=k, **opts, dtype=dtype),
    )


def explained_variance_figure(concepts: ConceptSet, hooks: Sequence[str] | None = None):
    """Plotly figure: explained-variance ratio per component (bars) and its running total
    (line), one panel per hook. ``concepts`` needs explained-variance scores (from
    :func:`pca`, possibly selected)."""
    import plotly.graph_objects as go  # plotly is slow to import; only figures need it
    from plotly.subplots import make_subplots

    hooks = concepts.hooks if hooks is None else list(hooks)
    for hook in hooks:
        concepts[hook]  # raises a clear error for an unknown hook
        if any(math.isnan(s) for s in concepts.scores[hook]):
            raise ValueError(
                f"hook {hook!r} has no scores; explained_variance_figure needs a ConceptSet "
                "from pca()"
            )
    spacing = 0.08 if len(hooks) < 2 else min(0.08, 0.9 / (len(hooks) - 1))
    fig = make_subplots(rows=len(hooks), cols=1, subplot_titles=hooks, vertical_spacing=spacing)
    for row, hook in enumerate(hooks, start=1):
        scores = concepts.scores[hook]
        cumulative = torch.tensor(scores, dtype=torch.float64).cumsum(0).tolist()
        labels = concepts.labels[hook]
        first = row == 1  # one legend entry per trace kind, not per panel
        fig.add_trace(
            go.Bar(x=labels, y=scores, name="explained variance", marker_color="#4c78a8",
                   showlegend=first, legendgroup="bar"),
            row=row, col=1,
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(x=labels, y=cumulative, name="cumulative", mode="lines+markers",
                       line={"color": "#e45756"}, showlegend=first, legendgroup="line"),
            row=row, col=1,
        )  # fmt: skip
        fig.update_yaxes(range=[0, 1.02], tickformat=".0%", title_text="variance", row=row)
    fig.update_layout(
        title="Explained variance of activation-difference PCs",
        height=320 * len(hooks) + 80,
        template="plotly_white",
    )
    return fig


def _provenance(
    src: Any,
    fits: dict[str, dict[str, Any]],
    model: Any,
    *,
    k: int,
    center: bool,
    assistant_only: bool,
    skip_first: bool,
    dtype: Any,
) -> dict[str, Any]:
    """What :func:`pca` records: its settings, the source's, and per hook the tokens used,
    the explained and total variance and the norm of the mean difference."""
    meta = {} if isinstance(src, dict) else src.meta
    provenance = make_provenance(
        "pca",
        model=model if model is not None else meta.get("model"),
        k=k,
        center=center,
        assistant_only=assistant_only,
        skip_first=skip_first and not isinstance(src, dict),
        dtype=str(dtype).removeprefix("torch."),
        hooks=list(fits),
        n_tokens={h: f["n"] for h, f in fits.items()},
        explained_variance={h: f["variance"] for h, f in fits.items()},
        explained_variance_ratio={h: f["ratio"] for h, f in fits.items()},
        total_variance={h: f["total"] for h, f in fits.items()},
        mean_diff_norm={h: f["mean_norm"] for h, f in fits.items()},
        source={key: meta[key] for key in _SOURCE_KEYS if key in meta},
    )
    provenance["data"] = _fingerprint(src)
    return provenance
