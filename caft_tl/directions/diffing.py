"""Which crosscoder latents did fine-tuning introduce? Decoder norms and Latent Scaling.

:func:`diff_crosscoder` makes one pass over paired activations and returns a
:class:`CrosscoderDiff`, one row per latent:

- **relative decoder norm** ``rel_norm = (||d_ft|| - ||d_base||) / (2 max(||d_ft||,
  ||d_base||)) + 1/2``: 0 for a base-only latent, 1 for a fine-tune-only one, 1/2 when both
  decoders are equally long; ``class`` from configurable thresholds (:class:`DiffThresholds`);
- **Latent Scaling** with the fine-tuned decoder row ``d`` of each latent (the "owner" side):
  closed-form ``beta = sum_x f(x) <d, y(x)> / (||d||^2 sum_x f(x)^2)``, the scalar that best
  explains target ``y`` with ``beta f(x) d``, for four targets in each model's normalised
  units: each model's reconstruction (``beta_recon_*``) and each model's error with the latent's
  own contribution added back (``beta_error_*``). Then ``nu_r = beta_recon_base /
  beta_recon_ft`` and ``nu_eps = beta_error_base / beta_error_ft`` (signed; for base-only
  latents the other way round, fine-tuned over base). A genuinely new latent
  explains nothing of the base model: both ratios near 0. A large ``nu_eps`` means the base
  activations still hold the direction but the base decoder was shrunk to zero (**complete
  shrinkage**, an artefact of L1's decoder-norm penalty); a large ``nu_r`` means other latents
  reconstruct it in the base model (**latent decoupling**);
- activity: firing frequency, mean and max activation.

The genuine fine-tune-only latents become a :class:`ConceptSet` of fine-tuned decoder
directions (:meth:`CrosscoderDiff.concepts`) for CAFT, and :func:`latent_examples` shows the
contexts where latents fire.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from caft_tl._io import load_frames, save_frames
from caft_tl.directions.concepts import ConceptSet, make_provenance
from caft_tl.directions.crosscoder import (
    Crosscoder,
    PairedActivations,
    model_index,
    paired_activations,
)
from caft_tl.errors import InputIndexError

__all__ = ["CrosscoderDiff", "DiffThresholds", "diff_crosscoder", "latent_examples"]

DIFF_FORMAT = "caft_tl.crosscoder_diff"
CLASSES = ("base-only", "shared", "finetuned-only", "other", "dead")


@dataclass
class DiffThresholds:
    """Where the latent classes and the Latent Scaling flags start.

    ``rel_norm <= base_only``: base-only; ``>= finetuned_only``: fine-tune-only; inside
    ``shared``: shared; anything else "other". A fine-tune-only latent is flagged as complete
    shrinkage when ``|nu_eps| >= max_nu_eps`` and as latent decoupling when ``|nu_r| >=
    max_nu_r`` (the defaults are those of the Latent Scaling reference implementation); it is
    ``genuine`` when neither holds. Latents active on fewer than ``min_active`` rows are dead.
    """

    base_only: float = 0.1
    finetuned_only: float = 0.9
    shared: tuple[float, float] = (0.4, 0.6)
    max_nu_eps: float = 0.2
    max_nu_r: float = 0.5
    min_active: int = 1

    def __post_init__(self) -> None:
        self.shared = (float(self.shared[0]), float(self.shared[1]))
        lo, hi = self.shared
        if not 0 <= self.base_only < lo <= hi < self.finetuned_only <= 1:
            raise ValueError(
                "thresholds must satisfy 0 <= base_only < shared[0] <= shared[1] < "
                f"finetuned_only <= 1, got {self.base_only}, {self.shared}, {self.finetuned_only}"
            )
        if self.max_nu_eps <= 0 or self.max_nu_r <= 0:
            raise ValueError("max_nu_eps and max_nu_r must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Decoder norms
# --------------------------------------------------------------------------------------------


def relative_norms(cc: Crosscoder) -> Float[Tensor, " n_latents"]:
    """``rel_norm`` per latent (0 base-only, 1/2 equal, 1 fine-tune-only)."""
    n = cc.decoder_norms().detach().double()
    top = torch.maximum(n[0], n[1]).clamp(min=1e-12)
    return 0.5 * (n[1] - n[0]) / top + 0.5


def _classes(rel: np.ndarray, active: np.ndarray, t: DiffThresholds) -> np.ndarray:
    cls = np.full(len(rel), "other", dtype=object)
    cls[(rel >= t.shared[0]) & (rel <= t.shared[1])] = "shared"
    cls[rel <= t.base_only] = "base-only"
    cls[rel >= t.finetuned_only] = "finetuned-only"
    cls[active < t.min_active] = "dead"
    return cls


# --------------------------------------------------------------------------------------------
# One pass: activity and Latent Scaling sums
# --------------------------------------------------------------------------------------------


class _Sums:
    """Running sums over rows for activity, the four betas and each model's FVU."""

    def __init__(self, cc: Crosscoder) -> None:
        n, d = cc.n_latents, cc.d_in
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.active, self.f, self.f2, self.max = z(n), z(n), z(n), z(n)
        self.recon, self.error = z(2, n), z(2, n)
        self.x, self.x2, self.err2 = z(2, d), z(2), z(2)
        self.rows = 0

    def add(self, cc: Crosscoder, xn: Tensor, owner: Tensor) -> None:
        f = cc.encode(xn, normalised=True).double()
        recon = cc.decode(f.to(xn.dtype)).double()
        err = xn.double() - recon
        owner = owner.double()
        self.active += (f > 0).sum(0).cpu()
        self.f += f.sum(0).cpu()
        self.f2 += f.pow(2).sum(0).cpu()
        self.max = torch.maximum(self.max, f.max(0).values.cpu())
        for m in range(2):
            self.recon[m] += (f * (recon[:, m] @ owner.T)).sum(0).cpu()
            self.error[m] += (f * (err[:, m] @ owner.T)).sum(0).cpu()
        self.x += xn.double().sum(0).cpu()
        self.x2 += xn.double().pow(2).sum((0, 2)).cpu()
        self.err2 += err.pow(2).sum((0, 2)).cpu()
        self.rows += len(xn)

    def betas(self, cc: Crosscoder, owner: Tensor) -> dict[str, Tensor]:
        owner = owner.double().cpu()
        own_sq = owner.pow(2).sum(-1)
        # Adding the latent's own contribution f d_m back to model m's error adds
        # f^2 <owner, d_m> per row: computed from the sums instead of per-row targets.
        self_term = torch.stack(
            [(owner * cc.W_dec.detach()[m].double().cpu()).sum(-1) for m in range(2)]
        )
        denominator = own_sq * self.f2
        out = {}
        for m, name in enumerate(("base", "finetuned")):
            out[f"beta_recon_{name}"] = self.recon[m] / denominator  # NaN for silent latents
            out[f"beta_error_{name}"] = (self.error[m] + self_term[m] * self.f2) / denominator
        return out

    def fvu(self) -> list[float]:
        total = self.x2 - self.x.pow(2).sum(-1) / max(self.rows, 1)
        return (self.err2 / total.clamp(min=1e-12)).tolist()


def diff_crosscoder(
    cc: Crosscoder,
    acts: Any,
    thresholds: DiffThresholds | None = None,
    *,
    owner: str = "finetuned",
    max_rows: int | None = None,
    batch_size: int = 4096,
    skip_first: bool = True,
    progress: bool = True,
) -> CrosscoderDiff:
    """Decoder-norm classes, activity and Latent Scaling for every latent of ``cc``.

    Args:
        acts: paired activations (see :func:`caft_tl.directions.paired_activations`) at the
            crosscoder's hook, e.g. the ``acts/`` folder :func:`train_crosscoder` kept, or
            held-out data cached with ``activation_diff(..., return_both=True)``.
        owner: whose decoder row Latent Scaling fits with ("finetuned": ratios are base /
            fine-tuned, small for latents new in the fine-tune; "base" for the reverse).
        max_rows: stop after this many rows (None: all).
    """
    thresholds = thresholds or DiffThresholds()
    pairs = _pairs_for(cc, acts)
    o = model_index(owner, "owner")
    device = next(cc.parameters()).device
    direction = cc.W_dec.detach()[o]
    sums, outliers = _Sums(cc), 0
    total = len(pairs) if max_rows is None else min(max_rows, len(pairs))
    was_training = cc.training
    cc.eval()
    bar = tqdm(total=total, desc="crosscoder diff", unit="row", disable=not progress)
    with torch.inference_mode(), bar:
        for chunk in pairs.chunks(skip_first):
            for x in chunk.split(batch_size):
                if max_rows is not None and sums.rows >= max_rows:
                    break
                if max_rows is not None:
                    x = x[: max_rows - sums.rows]
                bar.update(len(x))
                kept = cc.kept_rows(x)
                outliers += int((~kept).sum())
                if bool(kept.any()):
                    sums.add(cc, cc.normalise(x[kept].to(device)), direction)
    cc.train(was_training)
    if sums.rows == 0:
        raise ValueError("no activation rows to analyse (after leaving out first tokens)")
    table = _table(cc, sums, thresholds, o)
    meta = {
        "hook": cc.hook,
        "n_latents": cc.n_latents,
        "architecture": cc.architecture,
        "owner": owner,
        "thresholds": thresholds.to_dict(),
        "n_rows": sums.rows,
        "n_outliers": outliers,  # rows beyond the crosscoder's norm range, left out
        "fvu": dict(zip(("base", "finetuned"), sums.fvu(), strict=True)),
        "crosscoder": {k: v for k, v in cc.info().items() if k != "meta"},
        "models": {"base": cc.meta.get("base_model"), "finetuned": cc.meta.get("finetuned_model")},
        "training": cc.meta.get("training"),
    }
    return CrosscoderDiff(table, meta)


def _pairs_for(cc: Crosscoder, acts: Any) -> PairedActivations:
    pairs = paired_activations(acts, hook=cc.hook)
    if pairs.width != cc.d_in:
        raise ValueError(
            f"the activations are {pairs.width} wide, the crosscoder reads {cc.d_in} "
            f"(hook {cc.hook!r})"
        )
    return pairs


def _table(cc: Crosscoder, sums: _Sums, t: DiffThresholds, owner: int) -> pd.DataFrame:
    norms = cc.decoder_norms().detach().double().cpu()
    w = cc.W_dec.detach().double().cpu()
    cosine = (w[0] * w[1]).sum(-1) / (norms[0] * norms[1]).clamp(min=1e-12)
    rel = relative_norms(cc).cpu().numpy()
    active = sums.active.numpy()
    df = pd.DataFrame(
        {
            "latent": np.arange(cc.n_latents),
            "norm_base": norms[0].numpy(),
            "norm_finetuned": norms[1].numpy(),
            "rel_norm": rel,
            "cosine": cosine.numpy(),
            "class": _classes(rel, active, t),
            "frequency": active / sums.rows,
            "n_active": active.astype(int),
            "mean_activation": (sums.f / sums.active.clamp(min=1)).numpy(),
            "max_activation": sums.max.numpy(),
        }
    )
    for name, beta in sums.betas(cc, cc.W_dec.detach()[owner]).items():
        df[name] = beta.numpy()
    own, other = ("finetuned", "base") if owner == 1 else ("base", "finetuned")
    # Signed ratios, as the Latent Scaling paper defines them (nu = beta_base / beta_ft for
    # fine-tune-only latents): a negative nu says the other model holds the direction with
    # the opposite sign. The flags below compare |nu|, so the sign never lets one pass.
    with np.errstate(divide="ignore", invalid="ignore"):
        df["nu_r"] = df[f"beta_recon_{other}"] / df[f"beta_recon_{own}"]
        df["nu_eps"] = df[f"beta_error_{other}"] / df[f"beta_error_{own}"]
    df.loc[df["n_active"] == 0, ["nu_r", "nu_eps"]] = np.nan
    return _flag(df, t, own)


def _flag(df: pd.DataFrame, t: DiffThresholds, own: str) -> pd.DataFrame:
    specific = df["class"] == f"{own}-only"
    # |nu|: a base model that holds the direction with the opposite sign holds it too (the
    # reference implementation compares the signed ratio, which lets large negative ones pass).
    df["complete_shrinkage"] = specific & (df["nu_eps"].abs() >= t.max_nu_eps)
    df["latent_decoupling"] = specific & (df["nu_r"].abs() >= t.max_nu_r)
    finite = np.isfinite(df["nu_eps"]) & np.isfinite(df["nu_r"])
    df["genuine"] = specific & finite & ~df["complete_shrinkage"] & ~df["latent_decoupling"]
    return df


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass
class CrosscoderDiff:
    """Per-latent ``table`` (see the module docstring for the columns) and ``meta`` (hook,
    thresholds, rows, each model's FVU, the crosscoder's settings)."""

    table: pd.DataFrame
    meta: dict[str, Any]

    def __repr__(self) -> str:
        counts = self.table["class"].value_counts().to_dict()
        return (
            f"CrosscoderDiff({self.meta['n_latents']} latents at {self.meta['hook']!r}; "
            f"{counts}; {int(self.table['genuine'].sum())} genuine)"
        )

    @property
    def thresholds(self) -> DiffThresholds:
        return DiffThresholds(**self.meta["thresholds"])

    def with_thresholds(self, thresholds: DiffThresholds) -> CrosscoderDiff:
        """The same latents reclassified (no pass over the data needed)."""
        df = self.table.drop(
            columns=["class", "complete_shrinkage", "latent_decoupling", "genuine"]
        )
        df.insert(
            5, "class", _classes(df["rel_norm"].to_numpy(), df["n_active"].to_numpy(), thresholds)
        )
        owner = self.meta["owner"]
        meta = {**self.meta, "thresholds": thresholds.to_dict()}
        return CrosscoderDiff(_flag(df, thresholds, owner), meta)

    def summary(self) -> pd.DataFrame:
        """Latents per class; for the owner's specific class also how many Latent Scaling
        flags as complete shrinkage / latent decoupling, and how many stay genuine."""
        rows = []
        for cls in CLASSES:
            part = self.table[self.table["class"] == cls]
            rows.append(
                {
                    "class": cls,
                    "latents": len(part),
                    "complete_shrinkage": int(part["complete_shrinkage"].sum()),
                    "latent_decoupling": int(part["latent_decoupling"].sum()),
                    "genuine": int(part["genuine"].sum()),
                    "median_nu_eps": float(part["nu_eps"].median()) if len(part) else math.nan,
                    "median_nu_r": float(part["nu_r"].median()) if len(part) else math.nan,
                }
            )
        return pd.DataFrame(rows)

    def genuine(self, by: str = "frequency") -> pd.DataFrame:
        """The genuinely owner-specific latents, most ``by`` first."""
        return self.table[self.table["genuine"]].sort_values(by, ascending=False)

    def concepts(
        self,
        cc: Crosscoder,
        top: int | None = None,
        by: str = "frequency",
        latents: list[int] | None = None,
    ) -> ConceptSet:
        """A ConceptSet of fine-tuned decoder directions at the crosscoder's hook: the genuine
        latents (or the given ``latents``), the ``top`` most ``by`` first; usable for CAFT."""
        if (cc.n_latents, cc.hook) != (self.meta["n_latents"], self.meta["hook"]):
            raise ValueError("this diff was made with another crosscoder (size or hook differ)")
        if by not in self.table.columns:
            raise ValueError(f"by must be a column of the table, got {by!r}")
        chosen = self.genuine(by) if latents is None else self.table.loc[list(latents)]
        if top is not None:
            chosen = chosen.head(top)
        if chosen.empty:
            raise ValueError(
                "no latent to select: no genuine fine-tune-only latent at these thresholds "
                "(see summary(); with_thresholds() relaxes them)"
            )
        idx = [int(i) for i in chosen["latent"]]
        rows = cc.decoder_directions(self.meta["owner"])[idx]
        provenance = make_provenance(
            "crosscoder_latent_scaling",
            model=self.meta.get("models", {}).get("finetuned"),
            hook=self.meta["hook"],
            architecture=self.meta["architecture"],
            n_latents=self.meta["n_latents"],
            thresholds=self.meta["thresholds"],
            by=by,
            top=top,
            latents=idx,
            training=self.meta.get("training"),
        )
        return ConceptSet(
            {self.meta["hook"]: rows},
            labels={self.meta["hook"]: [f"latent {i}" for i in idx]},
            scores={self.meta["hook"]: [float(v) for v in chosen[by]]},
            provenance=provenance,
        )

    # ---- figures -----------------------------------------------------------------------

    def norm_figure(self, title: str | None = None):
        """Histogram of the relative decoder norm of live latents, thresholds marked."""
        import plotly.graph_objects as go

        live = self.table[self.table["class"] != "dead"]
        t = self.thresholds
        fig = go.Figure()
        for cls, color in zip(
            CLASSES[:4], ("#636efa", "#7f7f7f", "#ef553b", "#c7c7c7"), strict=True
        ):
            part = live[live["class"] == cls]
            fig.add_histogram(x=part["rel_norm"], name=f"{cls} ({len(part)})", marker_color=color,
                              xbins={"start": 0, "end": 1.0001, "size": 0.02})  # fmt: skip
        for x in (t.base_only, *t.shared, t.finetuned_only):
            fig.add_vline(x=x, line_dash="dot", line_color="black")
        fig.update_layout(
            barmode="stack", height=380, width=720,
            xaxis_title="relative decoder norm (0 base-only, 1 fine-tune-only)",
            yaxis_title="latents",
            title=title or f"Crosscoder latents at {self.meta['hook']} "
            f"({len(live)} live of {self.meta['n_latents']})",
        )  # fmt: skip
        return fig

    def nu_figure(self, title: str | None = None, clip: float = 2.0):
        """``nu_eps`` against ``nu_r`` for the owner-specific latents (coloured by verdict) and
        the shared ones (grey, the reference where both models use a latent alike)."""
        import plotly.graph_objects as go

        df = self.table
        t = self.thresholds
        own = f"{self.meta['owner']}-only"
        fig = go.Figure()
        groups = [
            ("shared (reference)", df["class"] == "shared", "#c7c7c7"),
            ("genuine", df["genuine"], "#00cc96"),
            ("complete shrinkage", (df["class"] == own) & df["complete_shrinkage"], "#ef553b"),
            ("latent decoupling only", (df["class"] == own) & ~df["complete_shrinkage"]
             & df["latent_decoupling"], "#ffa15a"),
        ]  # fmt: skip
        for name, mask, color in groups:
            part = df[mask & np.isfinite(df["nu_eps"]) & np.isfinite(df["nu_r"])]
            fig.add_scatter(
                x=part["nu_eps"].clip(-clip, clip), y=part["nu_r"].clip(-clip, clip),
                mode="markers", name=f"{name} ({len(part)})", marker={"color": color, "size": 6},
                text=[f"latent {i}" for i in part["latent"]],
                hovertemplate="%{text}<br>nu_eps %{x:.3f}<br>nu_r %{y:.3f}",
            )  # fmt: skip
        fig.add_vline(x=t.max_nu_eps, line_dash="dot")
        fig.add_hline(y=t.max_nu_r, line_dash="dot")
        fig.update_layout(
            height=460, width=620, xaxis_title="nu_eps (base error / fine-tuned error)",
            yaxis_title="nu_r (base reconstruction / fine-tuned reconstruction)",
            title=title or "Latent Scaling: genuine latents sit near the origin",
        )  # fmt: skip
        return fig

    def kept_figure(self, title: str | None = None):
        """Latents kept as fine-tune-only against the relative-norm threshold, before and
        after Latent Scaling's filter."""
        import plotly.graph_objects as go

        df = self.table[self.table["class"] != "dead"]
        t = self.thresholds
        grid = np.round(np.linspace(0.5, 1.0, 51), 3)
        finite = np.isfinite(df["nu_eps"]) & np.isfinite(df["nu_r"])
        passes = finite & (df["nu_eps"].abs() < t.max_nu_eps) & (df["nu_r"].abs() < t.max_nu_r)
        kept = [int((df["rel_norm"] >= g).sum()) for g in grid]
        genuine = [int(((df["rel_norm"] >= g) & passes).sum()) for g in grid]
        fig = go.Figure()
        fig.add_scatter(x=grid, y=kept, name="rel_norm >= threshold")
        fig.add_scatter(x=grid, y=genuine, name="... and passes Latent Scaling")
        fig.add_vline(x=t.finetuned_only, line_dash="dot")
        fig.update_layout(
            height=380, width=620, xaxis_title="fine-tune-only threshold on rel_norm",
            yaxis_title="latents kept", title=title or "Latents kept vs threshold",
        )  # fmt: skip
        return fig

    # ---- persistence -------------------------------------------------------------------

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A folder with ``latents.csv`` and ``diff.json``, written atomically."""
        meta = {"format": DIFF_FORMAT, "version": 1, **self.meta}
        return save_frames(path, {"latents": self.table}, "diff.json", meta, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CrosscoderDiff:
        frames, meta = load_frames(path, ["latents"], "diff.json", DIFF_FORMAT, "crosscoder diff")
        return cls(frames["latents"], meta)


# --------------------------------------------------------------------------------------------
# Contexts where latents fire
# --------------------------------------------------------------------------------------------


def latent_examples(
    cc: Crosscoder,
    acts: Any,
    latents: list[int],
    model: Any = None,
    k: int = 5,
    window: tuple[int, int] = (10, 2),
    skip_first: bool = True,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """The ``k`` rows where each latent fires most, with their context (the fired token is
    marked ``[[ ]]``; ``model`` or its tokenizer decodes tokens, else ids are shown)."""
    from caft_tl.directions.interpret import example_record, visible_text

    if not latents:
        raise ValueError("name at least one latent")
    bad = [i for i in latents if not 0 <= int(i) < cc.n_latents]
    if bad:
        raise InputIndexError(f"latents {bad} out of range (0..{cc.n_latents - 1})")
    pairs = _pairs_for(cc, acts)
    idx = torch.tensor([int(i) for i in latents])
    best_v = torch.full((len(idx), k), -math.inf)
    best_r = torch.full((len(idx), k), -1, dtype=torch.long)
    device = next(cc.parameters()).device
    with torch.inference_mode():
        for chunk, rows in pairs.chunks(skip_first, with_rows=True):
            for x, r in zip(chunk.split(batch_size), rows.split(batch_size), strict=True):
                kept = cc.kept_rows(x)
                x, r = x[kept], r[kept]
                f = cc.encode(x.to(device)).cpu()[:, idx].T  # [latents, n]
                values = torch.cat([best_v, f], 1)
                cand = torch.cat([best_r, r.expand(len(idx), -1)], 1)
                best_v, pos = values.topk(min(k, values.shape[1]), dim=1)
                best_r = cand.gather(1, pos)
    # A model, a bare tokenizer or None (token ids shown): interpret's records take a model.
    holder = model if hasattr(model, "tokenizer") else SimpleNamespace(tokenizer=model)
    records = []
    for i, latent in enumerate(idx.tolist()):
        for rank, (value, row) in enumerate(
            zip(best_v[i].tolist(), best_r[i].tolist(), strict=True)
        ):
            if row < 0 or value <= 0:
                continue
            record = example_record(holder, pairs.base, row, value, window)
            record["activation"] = record.pop("value")
            record["token"] = visible_text(record["token"])
            records.append({"latent": latent, "rank": rank, **record})
    front = ["latent", "rank", "activation", "token", "context"]
    frame = pd.DataFrame(records)
    if frame.empty:
        return pd.DataFrame(columns=front)
    return frame[front + [c for c in frame.columns if c not in front]]
