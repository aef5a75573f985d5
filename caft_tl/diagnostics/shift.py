"""Where ablation moves the model: projections, probes and SAE latents with and without it.

Zero-ablation sets each concept direction's projection to 0 at its hook. Unless the
projection was already centred on 0, that is a *shift*, and it moves everything downstream:
projections at later ablated hooks, concept probes, SAE latents. :func:`ablation_shift`
measures, on a model (no training) and data:

- per concept direction: its mean projection ``<q, h>`` on the clean model (``clean``),
  entering its own hook with the ablations at earlier hooks applied (``upstream``), and
  leaving it (``ablated``: 0 for zero-ablation, ``<q, mu>`` for mean-ablation);
- per probe direction (any ConceptSet, e.g. :func:`caft_tl.directions.mean_difference` of
  contrast sets): the mean projection clean and ablated, read after any ablation at its hook;
- per SAE latent (SAE-Lens SAEs, read at their hook after any ablation there): the mean
  activation and the fraction of tokens where it fires, clean and ablated: which latents
  zero-ablation pushes up and which down.

Changes are also given in units of the clean standard deviation (``change_sd``), which
says whether a shift is large next to the direction's natural variation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl._io import load_frames, now_iso, save_frames
from caft_tl.activations import stop_layer
from caft_tl.data.chat import pad_id
from caft_tl.directions.concepts import ConceptSet, check_hook_widths
from caft_tl.directions.sae import sae_hook_name
from caft_tl.interventions import Ablation

__all__ = ["AblationShift", "ablation_shift"]

SHIFT_FORMAT = "caft-tl/ablation-shift"


class _Moments:
    """Running masked sums of per-token read-outs ``[n, k]``: mean, std, firing rate."""

    def __init__(self) -> None:
        self.sum: Tensor | float = 0.0
        self.sq: Tensor | float = 0.0
        self.active: Tensor | float = 0.0
        self.n = 0

    def add(self, values: Float[Tensor, "n k"]) -> None:
        v = values.detach().to(torch.float64)
        self.sum = self.sum + v.sum(0)
        self.sq = self.sq + (v * v).sum(0)
        self.active = self.active + (v > 0).sum(0)
        self.n += v.shape[0]

    def mean(self) -> np.ndarray:
        return (self.sum / self.n).cpu().numpy()

    def std(self) -> np.ndarray:
        var = self.sq / self.n - (self.sum / self.n) ** 2
        return var.clamp(min=0).sqrt().cpu().numpy()

    def frac_active(self) -> np.ndarray:
        return (self.active / self.n).cpu().numpy()


def _sae_dict(saes: Any) -> dict[str, Any]:
    if saes is None:
        return {}
    if isinstance(saes, Mapping):
        return dict(saes)
    if not isinstance(saes, Sequence):
        saes = [saes]
    out: dict[str, Any] = {}
    for sae in saes:
        try:
            hook = sae_hook_name(sae, None)  # where SAE-Lens records it, as the rankers read it
        except ValueError:
            raise ValueError("an SAE records no hook_name; pass saes={hook: sae}") from None
        if hook in out:
            raise ValueError(f"two SAEs at hook {hook!r}; pass saes={{name: sae}} per hook")
        out[hook] = sae
    return out


def _readers(
    concepts: ConceptSet | None, probes: ConceptSet | None, saes: Mapping[str, Any]
) -> dict[tuple[str, str], Callable[[Tensor], Tensor]]:
    """(kind, hook) -> a function from ``[n, d]`` activations to ``[n, k]`` read-outs."""
    out: dict[tuple[str, str], Callable[[Tensor], Tensor]] = {}
    for kind, directions in (("direction", concepts), ("probe", probes)):
        if directions is None:
            continue
        for hook in directions.hooks:
            q = directions[hook].to(torch.float32)
            out[(kind, hook)] = lambda h, q=q: h.float() @ q.to(h.device).mT
    for hook, sae in saes.items():

        def encode(h: Tensor, sae: Any = sae) -> Tensor:
            w = next(sae.parameters())
            return sae.encode(h.to(w.device, w.dtype)).float()

        out[("sae", hook)] = encode
    return out


def _pass(
    model: HookedTransformer,
    batches: Sequence[tuple[Tensor, Tensor, Tensor]],
    readers: Mapping[tuple[str, str], Callable[[Tensor], Tensor]],
    ablation: Ablation | None,
    desc: str,
    progress: bool,
) -> dict[tuple[str, str], _Moments]:
    """One pass over the data; with an ablation, concept directions are also read *before*
    their own hook's ablation (key ``("upstream", hook)``)."""
    stats: dict[tuple[str, str], _Moments] = {}
    state: dict[str, Tensor] = {}

    def reader(key: tuple[str, str], fn: Callable[[Tensor], Tensor]):
        def hook_fn(act: Tensor, hook: Any) -> None:
            # [n, d] per measured token ([n, heads, d_head] hooks flattened to [n, d]).
            stats.setdefault(key, _Moments()).add(fn(act[state["mask"]].flatten(1)))

        return hook_fn

    hooks: list[tuple[str, Any]] = []
    ablation_hooks = dict(ablation.fwd_hooks(model)) if ablation is not None else {}
    for hook, fn in ablation_hooks.items():
        # PyTorch runs a hook point's forward hooks in the order they were added: read,
        # ablate, then the readers below see what the rest of the model sees.
        hooks.append((hook, reader(("upstream", hook), readers[("direction", hook)])))
        hooks.append((hook, fn))
    hooks += [(hook, reader((kind, hook), fn)) for (kind, hook), fn in readers.items()]
    stop = stop_layer([h for _, h in readers] + list(ablation_hooks))
    kwargs = {} if stop is None else {"stop_at_layer": stop}
    device = next(model.parameters()).device
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        for tokens, attention, mask in tqdm(batches, desc=desc, disable=not progress, leave=False):
            state["mask"] = mask.to(device)
            model(tokens.to(device), attention_mask=attention.to(device), **kwargs)
    return stats


def _token_batches(
    model: HookedTransformer, data: Any, batch_size: int, max_length: int | None, skip_first: bool
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(tokens, attention mask, measured positions) per batch."""
    from caft_tl.diagnostics.steering import input_batches, prepare_inputs

    prep = prepare_inputs(model, data, max_length)
    out = []
    for _, batch in input_batches(prep, batch_size, pad_id(model.tokenizer), "cpu"):
        mask = batch["attention_mask"].bool()
        if skip_first:
            mask[:, 0] = False  # the first token's activations are outliers in most models
        out.append((batch["input_ids"], batch["attention_mask"], mask))
    if not any(m.any() for _, _, m in out):
        raise ValueError("no token positions to measure (data too short with skip_first)")
    return out


def ablation_shift(
    model: HookedTransformer,
    concepts: ConceptSet,
    data: Any,
    *,
    mode: str = "zero",
    mean: Mapping[str, Tensor] | None = None,
    probes: ConceptSet | None = None,
    saes: Any = None,
    skip_first: bool = True,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> AblationShift:
    """Measure where ablating ``concepts`` (``mode`` "zero" or "mean") moves ``model`` on
    ``data`` (multiple-choice rows: their prompts; texts or chats: every token), at every
    real token but the first (``skip_first``). ``probes``: a ConceptSet of read-out
    directions; ``saes``: an SAE-Lens SAE, a list of them, or ``{hook: sae}``. Mean-ablation
    needs ``mean`` (``{hook: mu}``) or fits it on ``data``. See the module docstring."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean' (the forward changes), got {mode!r}")
    if not isinstance(concepts, ConceptSet):
        raise TypeError(f"concepts must be a ConceptSet, got {type(concepts).__name__}")
    concepts = concepts.orthonormalised() if concepts.non_orthonormal_hooks() else concepts
    check_hook_widths(model, concepts.widths)
    if probes is not None:
        check_hook_widths(model, probes.widths)
    sae_map = _sae_dict(saes)
    check_hook_widths(model, {h: int(s.cfg.d_in) for h, s in sae_map.items()})
    batches = _token_batches(model, data, batch_size, max_length, skip_first)
    ablation = Ablation(concepts, mode=mode)
    if mode == "mean":
        if mean is None:
            masked = [{"input_ids": ids, "mask": m} for ids, _, m in batches]
            ablation.fit_mean(model, masked)
        else:
            ablation.set_mean(mean)
    readers = _readers(concepts, probes, sae_map)
    was_training = model.training
    model.eval()
    try:
        clean = _pass(model, batches, readers, None, "clean", progress)
        ablated = _pass(model, batches, readers, ablation, f"{mode}-ablated", progress)
    finally:
        model.train(was_training)
    table = _table(concepts, probes, clean, ablated)
    meta = {
        "mode": mode,
        "n_tokens": clean[next(iter(clean))].n,
        "concepts": {h: concepts.labels[h] for h in concepts.hooks},
        "probes": None if probes is None else {h: probes.labels[h] for h in probes.hooks},
        "saes": {h: int(s.cfg.d_sae) for h, s in sae_map.items()},
        "model": model.cfg.model_name,
        "date": now_iso(),
    }
    return AblationShift(table, meta)


def _table(concepts, probes, clean, ablated) -> pd.DataFrame:
    frames = []
    for (kind, hook), stats in clean.items():
        after = ablated[(kind, hook)]
        k = len(stats.mean())
        if kind == "sae":
            labels = [str(i) for i in range(k)]
        else:
            labels = (concepts if kind == "direction" else probes).labels[hook]
        df = pd.DataFrame({
            "kind": kind, "hook": hook, "index": range(k), "label": labels,
            "clean": stats.mean(), "ablated": after.mean(), "clean_std": stats.std(),
        })  # fmt: skip
        if kind == "direction":
            df["upstream"] = ablated[("upstream", hook)].mean()
        if kind == "sae":
            df["clean_active"] = stats.frac_active()
            df["ablated_active"] = after.frac_active()
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    table["change"] = table["ablated"] - table["clean"]
    table["change_sd"] = table["change"] / table["clean_std"].where(table["clean_std"] > 0)
    return table


@dataclass
class AblationShift:
    """The result of :func:`ablation_shift`: ``table`` (one row per direction, probe
    direction or SAE latent: ``kind``, ``hook``, ``index``, ``label``, ``clean``,
    ``ablated``, ``change``, ``clean_std``, ``change_sd``; ``upstream`` for directions;
    ``clean_active`` / ``ablated_active`` for SAE latents) and ``meta``."""

    table: pd.DataFrame
    meta: dict[str, Any]

    def part(self, kind: str) -> pd.DataFrame:
        """The rows of one kind: "direction", "probe" or "sae"."""
        return self.table[self.table["kind"] == kind].reset_index(drop=True)

    def top_latents(self, n: int = 10, by: str = "change") -> pd.DataFrame:
        """The SAE latents ablation pushes up most and down most (``n`` each)."""
        sae = self.part("sae")
        if sae.empty:
            raise ValueError("no SAE was given")
        ranked = sae.sort_values(by, ascending=False)
        up, down = ranked.head(n).assign(moved="up"), ranked.tail(n)[::-1].assign(moved="down")
        return pd.concat([up[up[by] > 0], down[down[by] < 0]], ignore_index=True)

    def figure(self, n_latents: int = 10, title: str | None = None):
        """Bars of each direction's and probe's mean projection, clean vs ablated, and the
        SAE latents moved most (mean activation change)."""
        from plotly.subplots import make_subplots

        panels = [k for k in ("direction", "probe") if not self.part(k).empty]
        has_sae = not self.part("sae").empty
        names = [f"{k} projections" for k in panels]
        names += ["SAE latents moved most"] if has_sae else []
        fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
        for col, kind in enumerate(panels, start=1):
            df = self.part(kind)
            x = [f"{lab} @ {_short(h)}" for lab, h in zip(df["label"], df["hook"], strict=True)]
            for what, color in (("clean", "#636efa"), ("ablated", "#ef553b")):
                fig.add_bar(
                    x=x, y=df[what], name=what, marker_color=color, legendgroup=what,
                    showlegend=col == 1, row=1, col=col,
                    error_y={"type": "data", "array": df["clean_std"]} if what == "clean" else None,
                )  # fmt: skip
        if has_sae:
            top = self.top_latents(n_latents)
            x = [f"{_short(h)} #{i}" for h, i in zip(top["hook"], top["index"], strict=True)]
            colors = ["#00cc96" if m == "up" else "#ab63fa" for m in top["moved"]]
            fig.add_bar(x=x, y=top["change"], marker_color=colors, name="latent change",
                        showlegend=False, row=1, col=len(names))  # fmt: skip
        fig.update_layout(
            barmode="group",
            height=420,
            width=max(520, 480 * len(names)),
            title=title
            or f"Where {self.meta['mode']}-ablation moves the model "
            f"({self.meta['n_tokens']} tokens; clean bars show ±1 sd)",
        )
        return fig

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """A folder with ``table.csv`` and ``shift.json``, written atomically."""
        meta = {"format": SHIFT_FORMAT, "version": 1, **self.meta}
        return save_frames(path, {"table": self.table}, "shift.json", meta, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AblationShift:
        frames, meta = load_frames(path, ["table"], "shift.json", SHIFT_FORMAT, "ablation shift")
        return cls(frames["table"], meta)


def _short(hook: str) -> str:
    parts = hook.split(".")
    return f"L{parts[1]}" if len(parts) > 2 and parts[0] == "blocks" else hook
