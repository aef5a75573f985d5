"""Projection and steering interventions as TransformerLens hook functions.

Every intervention is a set of forward hooks, one per hook point of its ConceptSet; the maths
lives in :func:`project` (``Q Q^T h`` along the last dimension), which all modes share:

- ``Ablation(mode="zero")``:     ``h - Q Q^T h``            (CAFT as published)
- ``Ablation(mode="mean")``:     ``h - Q Q^T (h - mu)``
- ``Ablation(mode="detached")``: ``h - stopgrad(Q Q^T h)``  (activation effect only)
- ``Ablation(mode="gradient")``: ``h`` forward, ``g - Q Q^T g`` backward (gradient effect only)
- ``Steering(coef)``:            ``h + coef Q Q^T mu``, or ``h + coef v`` for explicit vectors

Use ``with intervention.applied(model): ...`` (hooks always removed on exit), or pass
``intervention.fwd_hooks(model)`` to ``model.run_with_hooks`` / ``model.hooks``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from caft_tl._io import atomic_folder, now_iso, read_json, read_tensors, write_tensors
from caft_tl.activations import MeanBatch as Batch
from caft_tl.activations import mean_activations
from caft_tl.directions.concepts import ConceptSet, check_hook_widths

__all__ = [
    "Ablation",
    "Intervention",
    "Steering",
    "load_intervention",
    "InterventionLike",
    "mean_activations",
    "project",
]

AblationMode = Literal["zero", "mean", "detached", "gradient"]
HookFn = Callable[[Tensor, Any], Tensor]
# A batch for mean fitting: tokens, (tokens, mask), or {"tokens"|"input_ids": .., "mask": ..}.

INTERVENTION_FORMAT = "caft-tl/intervention"
INTERVENTION_FILE = "intervention.json"
TENSORS_FILE = "intervention.safetensors"


# --------------------------------------------------------------------------------------------
# The maths
# --------------------------------------------------------------------------------------------


def project(h: Float[Tensor, "... d"], q: Float[Tensor, "d k"]) -> Float[Tensor, "... d"]:
    """``Q Q^T h`` for every vector along the last dimension (Q has orthonormal columns)."""
    return (h @ q) @ q.mT


class _ProjectedGradient(torch.autograd.Function):
    """Identity forward; backward removes the gradient's component in span(Q)."""

    @staticmethod
    def forward(ctx: Any, act: Tensor, q: Tensor) -> Tensor:
        ctx.save_for_backward(q)
        return act.view_as(act)  # a view, as autograd expects a new tensor object

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (q,) = ctx.saved_tensors
        return grad - project(grad, q), None


# --------------------------------------------------------------------------------------------
# Interventions
# --------------------------------------------------------------------------------------------


def _orthonormal_or_warn(concepts: ConceptSet) -> ConceptSet:
    bad = concepts.non_orthonormal_hooks()
    if not bad:
        return concepts
    warnings.warn(
        f"directions at {bad} are not orthonormal; orthonormalising them with QR (same "
        "subspace, new rows). Pass concepts.orthonormalised() to silence this.",
        UserWarning,
        stacklevel=4,
    )
    return concepts.orthonormalised()


def _check_vectors(
    name: str, vectors: Mapping[str, Tensor], widths: Mapping[str, int] | None
) -> dict[str, Tensor]:
    """Validate per-hook 1-D vectors (means or steering vectors)."""
    out = {}
    for hook, v in vectors.items():
        if widths is not None and hook not in widths:
            raise ValueError(f"{name} given for hook {hook!r}, which has no directions")
        if not isinstance(v, Tensor) or v.ndim != 1 or not v.is_floating_point():
            raise ValueError(f"{name} at hook {hook!r} must be a 1-D float tensor")
        if widths is not None and v.shape[0] != widths[hook]:
            raise ValueError(
                f"{name} at hook {hook!r} has width {v.shape[0]}, directions {widths[hook]}"
            )
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} at hook {hook!r} contains NaN or inf")
        out[hook] = v.detach()
    return out


@runtime_checkable
class InterventionLike(Protocol):
    """What training, evaluation and sampling need of an intervention: hooks on for a
    ``with`` block and removed however it exits. :class:`Ablation` and :class:`Steering`
    are the library's; anything with this method works in their place."""

    def applied(self, model: Any) -> AbstractContextManager[Any]: ...


class Intervention:
    """Base class: forward hooks at the hook points of a ConceptSet (or of steering vectors).

    Subclasses define :meth:`_apply` (the hook's maths) and optionally :meth:`_shift` (a
    constant added after it), plus ``_config`` / ``_from_saved`` for persistence.
    """

    registry: ClassVar[dict[str, type[Intervention]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Intervention.registry[cls.__name__] = cls  # so load_intervention finds the class

    def __init__(
        self, concepts: ConceptSet | None, mean: Mapping[str, Tensor] | None = None
    ) -> None:
        self.concepts = None if concepts is None else _orthonormal_or_warn(concepts)
        self.mean: dict[str, Tensor] = {}
        # (hook, device, dtype) -> (Q, shift): moved once per device/dtype, not per call.
        self._cache: dict[tuple[str, torch.device, torch.dtype], tuple[Any, Any]] = {}
        if mean is not None:
            self.set_mean(mean)

    # ---- what subclasses provide ---------------------------------------------------------

    @property
    def widths(self) -> dict[str, int]:
        assert self.concepts is not None
        return self.concepts.widths

    def _shift(self, hook: str) -> Tensor | None:
        return None

    def _apply(self, act: Tensor, q: Tensor | None, shift: Tensor | None) -> Tensor:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def _saved_tensors(self) -> dict[str, Tensor]:
        return {f"mean/{h}": mu for h, mu in self.mean.items()}

    @classmethod
    def _from_saved(
        cls, concepts: ConceptSet | None, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> Intervention:
        raise NotImplementedError

    # ---- means ---------------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self.widths)

    def set_mean(self, mean: Mapping[str, Tensor]) -> Intervention:
        """Set mean activations ``{hook: [d]}`` (merged into any already set)."""
        self.mean.update(_check_vectors("mean", mean, self.widths))
        self._cache.clear()
        return self

    def fit_mean(
        self,
        model: Any,
        data: Tensor | Iterable[Batch],
        *,
        mask: Tensor | None = None,
        batch_size: int = 8,
    ) -> Intervention:
        """Measure the mean activation at every hook on reference data (run this on the
        model *without* interventions applied); returns self."""
        check_hook_widths(model, self.widths)
        means = mean_activations(model, self.hooks, data, mask=mask, batch_size=batch_size)
        return self.set_mean(means)

    def _require_mean(self, hook: str) -> Tensor:
        if hook not in self.mean:
            raise ValueError(
                f"{self!r} needs the mean activation at hook {hook!r}: call "
                ".fit_mean(model, tokens) first, or pass mean={hook: mu}"
            )
        return self.mean[hook]

    # ---- hooks -----------------------------------------------------------------------------

    def _prepared(self, hook: str, act: Tensor) -> tuple[Tensor | None, Tensor | None]:
        key = (hook, act.device, act.dtype)
        if key not in self._cache:
            q = None if self.concepts is None else self.concepts[hook].mT
            shift = self._shift(hook)
            self._cache[key] = tuple(
                None if t is None else t.to(device=act.device, dtype=act.dtype) for t in (q, shift)
            )
        return self._cache[key]

    def _hook_fn(self, name: str) -> HookFn:
        width = self.widths[name]

        # TransformerLens calls hook functions as fn(activation, hook=hook_point).
        def hook_fn(act: Float[Tensor, "... d"], hook: Any) -> Float[Tensor, "... d"]:
            if act.shape[-1] != width:  # cheap guard for activations validate() never saw
                raise ValueError(
                    f"width mismatch at hook {name!r}: activation {tuple(act.shape)}, "
                    f"directions have width {width}"
                )
            q, shift = self._prepared(name, act)
            return self._apply(act, q, shift)

        hook_fn.__name__ = f"{type(self).__name__}[{name}]"  # readable in model.list_hooks()
        return hook_fn

    def fwd_hooks(self, model: Any) -> list[tuple[str, HookFn]]:
        """Validated ``[(hook_name, fn)]`` for ``model.run_with_hooks`` / ``model.hooks``."""
        check_hook_widths(model, self.widths)
        for hook in self.hooks:
            self._shift(hook)  # raises now, not mid-forward, when a needed mean is missing
        return [(hook, self._hook_fn(hook)) for hook in self.hooks]

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Install the hooks for the ``with`` block; they are removed however it exits
        (exceptions and KeyboardInterrupt included: ``model.hooks`` cleans up in a finally)."""
        with model.hooks(fwd_hooks=self.fwd_hooks(model)):
            yield model

    # ---- persistence ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save as a folder: the ConceptSet files + intervention.json + tensors, atomically."""
        with atomic_folder(path, overwrite) as tmp:
            if self.concepts is not None:
                self.concepts.write_into(tmp)
            meta = {
                "format": INTERVENTION_FORMAT,
                "version": 1,
                "type": type(self).__name__,
                "config": self._config(),
                "has_concepts": self.concepts is not None,
                "date": now_iso(),
            }
            (tmp / INTERVENTION_FILE).write_text(json.dumps(meta, indent=2))
            write_tensors(self._saved_tensors(), tmp / TENSORS_FILE)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Intervention:
        loaded = load_intervention(path)
        if not isinstance(loaded, cls):
            raise TypeError(f"{path} holds a {type(loaded).__name__}, not a {cls.__name__}")
        return loaded


def _prefixed(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class Ablation(Intervention):
    """Project concept directions out of the activations at their hook points.

    ``mode``: "zero" (``h - QQ^T h``), "mean" (``h - QQ^T (h - mu)``, needs ``mean`` or
    :meth:`fit_mean`), "detached" (zero's forward, identity backward) or "gradient"
    (identity forward, backward ``g - QQ^T g``).
    """

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean", "detached", "gradient")

    def __init__(
        self,
        concepts: ConceptSet,
        mode: AblationMode = "zero",
        mean: Mapping[str, Tensor] | None = None,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; choose one of {self.MODES}")
        if not isinstance(concepts, ConceptSet):
            raise TypeError(f"Ablation needs a ConceptSet, got {type(concepts).__name__}")
        self.mode = mode
        super().__init__(concepts, mean)

    def __repr__(self) -> str:
        n = self.concepts.n_directions if self.concepts is not None else 0
        return f"Ablation(mode={self.mode!r}, {n} directions at {self.hooks})"

    def _shift(self, hook: str) -> Tensor | None:
        if self.mode != "mean":
            return None
        # h - QQ^T(h - mu) = (h - QQ^T h) + QQ^T mu: the second term is a constant per hook.
        q = self.concepts[hook].mT.to(torch.float64)
        return project(self._require_mean(hook).to(torch.float64), q)

    def _apply(self, act: Tensor, q: Tensor | None, shift: Tensor | None) -> Tensor:
        if self.mode == "gradient":
            return _ProjectedGradient.apply(act, q)
        removed = project(act, q)
        if self.mode == "detached":
            removed = removed.detach()  # gradient flows through h as if nothing were removed
        out = act - removed
        return out if shift is None else out + shift

    def _config(self) -> dict[str, Any]:
        return {"mode": self.mode}

    @classmethod
    def _from_saved(
        cls, concepts: ConceptSet | None, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> Ablation:
        return cls(concepts, mode=config["mode"], mean=_prefixed(tensors, "mean/") or None)


class Steering(Intervention):
    """Add a constant to the activations at every position.

    With a ConceptSet: ``h + coef * QQ^T mu`` (mu from ``mean`` or :meth:`fit_mean`);
    ``coef=-1`` reproduces zero-ablation's mean shift. With ``vectors={hook: v}`` (and
    ``concepts=None``): ``h + coef * v``.
    """

    def __init__(
        self,
        concepts: ConceptSet | None,
        coef: float,
        *,
        mean: Mapping[str, Tensor] | None = None,
        vectors: Mapping[str, Tensor] | None = None,
    ) -> None:
        if (concepts is None) == (vectors is None):
            raise ValueError("Steering needs a ConceptSet or vectors={hook: v}: exactly one")
        if vectors is not None and mean is not None:
            raise ValueError("mean= is for steering along concepts; vectors= steer directly")
        if vectors is not None and not vectors:
            raise ValueError("vectors= is empty")
        self.coef = float(coef)
        self.vectors = {} if vectors is None else _check_vectors("vector", vectors, None)
        super().__init__(concepts, mean)

    def __repr__(self) -> str:
        by = "vectors" if self.concepts is None else f"{self.concepts.n_directions} directions"
        return f"Steering(coef={self.coef}, {by} at {self.hooks})"

    @property
    def widths(self) -> dict[str, int]:
        if self.concepts is None:
            return {hook: v.shape[0] for hook, v in self.vectors.items()}
        return self.concepts.widths

    def fit_mean(self, model: Any, data: Any, **kwargs: Any) -> Steering:
        if self.concepts is None:
            raise ValueError("steering by explicit vectors uses no mean")
        return super().fit_mean(model, data, **kwargs)  # type: ignore[return-value]

    def _shift(self, hook: str) -> Tensor:
        if self.concepts is None:
            return self.coef * self.vectors[hook]
        q = self.concepts[hook].mT.to(torch.float64)
        return self.coef * project(self._require_mean(hook).to(torch.float64), q)

    def _apply(self, act: Tensor, q: Tensor | None, shift: Tensor | None) -> Tensor:
        return act + shift

    def _config(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def _saved_tensors(self) -> dict[str, Tensor]:
        return {**super()._saved_tensors(), **{f"vector/{h}": v for h, v in self.vectors.items()}}

    @classmethod
    def _from_saved(
        cls, concepts: ConceptSet | None, config: dict[str, Any], tensors: dict[str, Tensor]
    ) -> Steering:
        return cls(
            concepts,
            config["coef"],
            mean=_prefixed(tensors, "mean/") or None,
            vectors=_prefixed(tensors, "vector/") or None,
        )


def load_intervention(path: str | os.PathLike) -> Intervention:
    """Load any intervention saved with ``.save(path)``, as its own class."""
    folder = Path(path)
    what = f"cannot load intervention from {folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no such folder")
    meta = read_json(folder / INTERVENTION_FILE, what)
    if meta.get("format") != INTERVENTION_FORMAT:
        raise ValueError(f"{what}: {INTERVENTION_FILE} is not a caft-tl intervention")
    cls = Intervention.registry.get(meta.get("type"))
    if cls is None:
        raise ValueError(f"{what}: unknown intervention type {meta.get('type')!r}")
    try:
        config, has_concepts = meta["config"], meta["has_concepts"]
    except KeyError as err:
        raise ValueError(f"{what}: {INTERVENTION_FILE} lacks the field {err}") from None
    concepts = ConceptSet.load(folder) if has_concepts else None
    tensors = read_tensors(folder / TENSORS_FILE, what)
    return cls._from_saved(concepts, config, tensors)
