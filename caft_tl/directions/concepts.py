"""ConceptSet: named directions at TransformerLens hook points, saved and loaded as a folder.

A ConceptSet is the artefact between "find directions" (PCA, SAE latents, crosscoders) and
"ablate them while fine-tuning". It keeps, for every hook point, a ``[k, d]`` tensor of
directions (one row per direction) with a label and a score for each row, plus a provenance
record (how the directions were made), so a saved set can be audited later.

On disk a set is a folder with ``directions.safetensors`` (one tensor per hook) and
``concepts.json`` (hook order, labels, scores, provenance).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from caft_tl._io import atomic_folder, now_iso, read_json, read_tensors, write_tensors
from caft_tl.errors import InputIndexError

__all__ = [
    "ConceptSet",
    "activation_shapes",
    "check_hook_widths",
    "data_fingerprint",
    "make_provenance",
]

FORMAT = "caft-tl/concept-set"
FORMAT_VERSION = 1
DIRECTIONS_FILE = "directions.safetensors"
META_FILE = "concepts.json"


# --------------------------------------------------------------------------------------------
# Provenance helpers
# --------------------------------------------------------------------------------------------


def data_fingerprint(data: Any) -> str:
    """A short sha256 of tokens / texts, so a saved set records *which* data made it.

    Accepts a tensor, a string, or (nested) sequences / mappings of those.
    """
    digest = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, str):
            digest.update(x.encode())
        elif isinstance(x, Mapping):
            for key in sorted(x, key=str):
                digest.update(str(key).encode())
                feed(x[key])
        elif isinstance(x, Iterable):
            for item in x:
                feed(item)
        else:
            digest.update(repr(x).encode())
        digest.update(b"\x00")  # separator: ["ab"] and ["a", "b"] must differ

    feed(data)
    return "sha256:" + digest.hexdigest()[:16]


def make_provenance(
    method: str, model: Any = None, data: Any = None, **parameters: Any
) -> dict[str, Any]:
    """Build the provenance record a direction-finding method should attach to its ConceptSet.

    ``model`` may be a HookedTransformer (its ``cfg.model_name`` is used) or a name.
    """
    if model is not None and not isinstance(model, str):
        model = getattr(getattr(model, "cfg", None), "model_name", type(model).__name__)
    return {
        "method": method,
        "model": model,
        "data": None if data is None else data_fingerprint(data),
        "parameters": parameters,
        "date": now_iso(),
    }


def _check_json(obj: Any, what: str) -> None:
    # Fail when the object is built, not later when the user saves hours of work.
    try:
        json.dumps(obj, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable: {err}") from None


# --------------------------------------------------------------------------------------------
# Activation shapes at hook points (for validation)
# --------------------------------------------------------------------------------------------

# Hooks whose activation is the residual-stream width; no forward pass needed to know it.
_D_MODEL_HOOK = re.compile(r"(^|\.)hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out|embed)$")
# Per-model cache of probed per-token shapes; weak so a deleted model frees its entry.
_SHAPE_CACHE: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]] = (
    weakref.WeakKeyDictionary()
)


def _unknown_hook_error(hook: str, known: Iterable[str], where: str) -> ValueError:
    close = difflib.get_close_matches(hook, list(known), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ValueError(f"hook {hook!r} is not {where}.{hint}")


def _probe_shapes(model: Any, hooks: list[str]) -> dict[str, tuple[int, ...]]:
    """Per-token activation shapes (everything after [batch, pos]) from a 1-token forward."""
    seen: dict[str, tuple[int, ...]] = {}

    def capture(act: Tensor, hook: Any) -> None:
        seen[hook.name] = tuple(act.shape[2:])

    device = next(model.parameters()).device
    tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, capture) for h in hooks]):
        model(tokens, return_type=None)
    silent = [h for h in hooks if h not in seen]
    if silent:
        raise ValueError(
            f"hook(s) {silent} exist but did not fire in a forward pass; they may need a "
            "config flag (e.g. cfg.use_attn_result / use_split_qkv_input)."
        )
    return seen


def activation_shapes(model: Any, hooks: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Per-token activation shape at each hook (``(d_model,)`` for the residual stream,
    ``(n_heads, d_head)`` for ``attn.hook_z``...). Unknown hooks raise a ValueError with
    close matches. Shapes of non-residual hooks come from one cached 1-token forward."""
    hooks = list(hooks)
    known = model.hook_dict
    for hook in hooks:
        if hook not in known:
            raise _unknown_hook_error(hook, known, "a hook point of this model")
    cache = _SHAPE_CACHE.setdefault(model, {})
    d_model = getattr(getattr(model, "cfg", None), "d_model", None)
    missing = []
    for hook in hooks:
        if hook in cache:
            continue
        if d_model is not None and _D_MODEL_HOOK.search(hook):
            cache[hook] = (d_model,)
        else:
            missing.append(hook)
    if missing:
        cache.update(_probe_shapes(model, missing))
    return {hook: cache[hook] for hook in hooks}


def check_hook_widths(model: Any, widths: Mapping[str, int]) -> None:
    """Raise a ValueError naming the hook when a hook is unknown or its activation's last
    dimension is not the expected width (the projection always acts on the last dim)."""
    shapes = activation_shapes(model, widths)
    for hook, width in widths.items():
        shape = shapes[hook]
        if not shape or shape[-1] != width:
            raise ValueError(
                f"width mismatch at hook {hook!r}: directions have width {width}, but the "
                f"activation there has per-token shape {shape} (after [batch, pos]); the "
                "projection acts on the last dimension, so it must equal the width."
            )


# --------------------------------------------------------------------------------------------
# ConceptSet
# --------------------------------------------------------------------------------------------


def _as_directions(hook: Any, value: Tensor | Sequence[Tensor]) -> Float[Tensor, "k d"]:
    if not isinstance(hook, str) or not hook:
        raise TypeError(f"hook names must be non-empty strings, got {hook!r}")
    if not isinstance(value, Tensor):
        vectors = list(value)
        widths = {tuple(v.shape) for v in vectors}
        if not vectors or len(widths) != 1 or len(next(iter(widths))) != 1:
            raise ValueError(
                f"hook {hook!r}: give a [k, d] tensor or a non-empty list of 1-D vectors of "
                f"the same width (got shapes {sorted(widths)})"
            )
        value = torch.stack(vectors)
    if value.ndim != 2:
        hint = " (one direction? use v[None])" if value.ndim == 1 else ""
        raise ValueError(f"hook {hook!r}: directions must be 2-D [k, d], got {value.shape}{hint}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(f"hook {hook!r}: directions tensor is empty ({tuple(value.shape)})")
    if not value.is_floating_point():
        raise TypeError(f"hook {hook!r}: directions must be floating point, got {value.dtype}")
    if not torch.isfinite(value).all():
        raise ValueError(f"hook {hook!r}: directions contain NaN or inf")
    return value.detach()


def _per_direction(
    name: str,
    given: Mapping[str, Sequence[Any]] | None,
    directions: Mapping[str, Tensor],
    default: Callable[[int], Sequence[Any]],
) -> dict[str, list[Any]]:
    """One value per direction at each hook: the given ones (lengths checked) or defaults."""
    given = dict(given or {})
    extra = sorted(set(given) - set(directions))
    if extra:
        raise ValueError(f"{name} given for hooks with no directions: {extra}")
    out = {}
    for hook, d in directions.items():
        values = list(given[hook]) if hook in given else list(default(d.shape[0]))
        if len(values) != d.shape[0]:
            raise ValueError(f"hook {hook!r}: {len(values)} {name} for {d.shape[0]} directions")
        out[hook] = values
    return out


def _score_to_json(x: float) -> float | None:
    return None if math.isnan(x) else x  # NaN is not standard JSON


class ConceptSet:
    """Directions at TransformerLens hook points: ``{hook_name: Float[Tensor, "k d"]}``.

    Rows are directions. ``labels`` / ``scores`` hold one entry per row (defaults: the row
    index as a string, and NaN). ``provenance`` records how the set was made (see
    :func:`make_provenance`); it must be JSON-serialisable and gets a ``date`` if absent.
    Sets are treated as immutable: every method returns a new set.
    """

    def __init__(
        self,
        directions: Mapping[str, Float[Tensor, "k d"] | Sequence[Float[Tensor, " d"]]],
        labels: Mapping[str, Sequence[str]] | None = None,
        scores: Mapping[str, Sequence[float]] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        if not directions:
            raise ValueError("a ConceptSet needs directions at one hook at least")
        self.directions: dict[str, Tensor] = {
            hook: _as_directions(hook, value) for hook, value in directions.items()
        }
        labels_in = _per_direction("labels", labels, self.directions, range)
        scores_in = _per_direction("scores", scores, self.directions, lambda k: [math.nan] * k)
        self.labels = {h: [str(x) for x in v] for h, v in labels_in.items()}
        self.scores = {h: [float(x) for x in v] for h, v in scores_in.items()}
        self.provenance: dict[str, Any] = dict(provenance or {})
        self.provenance.setdefault("date", now_iso())
        _check_json(self.provenance, "provenance")

    # ---- basic views -------------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self.directions)

    @property
    def n_directions(self) -> int:
        """Total number of directions over all hooks."""
        return sum(d.shape[0] for d in self.directions.values())

    @property
    def widths(self) -> dict[str, int]:
        return {hook: d.shape[1] for hook, d in self.directions.items()}

    def __len__(self) -> int:
        return self.n_directions

    def __getitem__(self, hook: str) -> Float[Tensor, "k d"]:
        if hook not in self.directions:
            raise _unknown_hook_error(hook, self.directions, "in this ConceptSet")
        return self.directions[hook]

    def __contains__(self, hook: object) -> bool:
        return hook in self.directions

    def __repr__(self) -> str:
        parts = ", ".join(f"{h}: {d.shape[0]}x{d.shape[1]}" for h, d in self.directions.items())
        method = self.provenance.get("method")
        tail = f", method={method!r}" if method else ""
        return f"ConceptSet({self.n_directions} directions; {parts}{tail})"

    def _derived(
        self,
        directions: dict[str, Tensor],
        labels: dict[str, list[str]],
        scores: dict[str, list[float]],
        step: dict[str, Any] | None,
    ) -> ConceptSet:
        # Derived sets keep the original provenance and append what was done to it.
        provenance = dict(self.provenance)
        if step is not None:
            provenance["history"] = [*provenance.get("history", []), step]
        return ConceptSet(directions, labels, scores, provenance)

    # ---- transformations ----------------------------------------------------------------

    def select(self, selection: Mapping[str, Sequence[int]]) -> ConceptSet:
        """Keep only the given rows at the given hooks (hooks not named are dropped)."""
        directions, labels, scores = {}, {}, {}
        for hook, indices in selection.items():
            d = self[hook]
            idx = [int(i) for i in indices]
            bad = [i for i in idx if not 0 <= i < d.shape[0]]
            if bad:
                raise InputIndexError(
                    f"hook {hook!r} has {d.shape[0]} directions (0..{d.shape[0] - 1}); "
                    f"index {bad} out of range"
                )
            if len(set(idx)) != len(idx):
                raise ValueError(f"hook {hook!r}: repeated indices in {idx}")
            directions[hook] = d[idx]
            labels[hook] = [self.labels[hook][i] for i in idx]
            scores[hook] = [self.scores[hook][i] for i in idx]
        step = {"op": "select", "selection": {h: [int(i) for i in v] for h, v in selection.items()}}
        return self._derived(directions, labels, scores, step)

    def union(self, other: ConceptSet) -> ConceptSet:
        """Concatenate directions hook by hook (self's rows first)."""
        directions = dict(self.directions)
        labels = {h: list(v) for h, v in self.labels.items()}
        scores = {h: list(v) for h, v in self.scores.items()}
        for hook, d in other.directions.items():
            if hook not in directions:
                directions[hook] = d
                labels[hook], scores[hook] = list(other.labels[hook]), list(other.scores[hook])
                continue
            mine = directions[hook]
            if mine.shape[1] != d.shape[1]:
                raise ValueError(
                    f"cannot unite at hook {hook!r}: widths {mine.shape[1]} and {d.shape[1]}"
                )
            dtype = torch.promote_types(mine.dtype, d.dtype)
            directions[hook] = torch.cat([mine.to(dtype), d.to(mine.device, dtype)])
            labels[hook] += other.labels[hook]
            scores[hook] += other.scores[hook]
        provenance = {"method": "union", "parts": [self.provenance, other.provenance]}
        return ConceptSet(directions, labels, scores, provenance)

    __or__ = union

    def orthonormalised(
        self, drop_dependent: bool = False, rtol: float | None = None
    ) -> ConceptSet:
        """Orthonormal rows spanning the same subspaces (QR per hook, in float64).

        Row i keeps the label of input row i and points the same way as its component
        orthogonal to rows 0..i-1. A row that is (nearly) a combination of earlier rows has
        no such component: that is an error, or with ``drop_dependent=True`` it is dropped
        (recorded in the provenance). ``rtol`` is relative to the largest row norm; by
        default ``max(k, d)`` times the input dtype's machine epsilon.
        """
        directions, labels, scores, dropped = {}, {}, {}, {}
        for hook, d in self.directions.items():
            q, keep = _orthonormal_rows(hook, d, self.labels[hook], drop_dependent, rtol)
            directions[hook] = q
            labels[hook] = [self.labels[hook][i] for i in keep]
            scores[hook] = [self.scores[hook][i] for i in keep]
            gone = sorted(set(range(d.shape[0])) - set(keep))
            if gone:
                dropped[hook] = gone
        return self._derived(
            directions,
            labels,
            scores,
            {"op": "orthonormalised", **({"dropped": dropped} if dropped else {})},
        )

    def non_orthonormal_hooks(self, atol: float | None = None) -> list[str]:
        """Hooks whose rows are not orthonormal (``max |D D^T - I| > atol``; by default
        1e-5, or 10 machine epsilons for half-precision directions)."""
        bad = []
        for hook, d in self.directions.items():
            d64 = d.detach().to(torch.float64)
            eye = torch.eye(d.shape[0], dtype=torch.float64, device=d.device)
            tol = atol if atol is not None else max(1e-5, 10 * torch.finfo(d.dtype).eps)
            if (d64 @ d64.T - eye).abs().max() > tol:
                bad.append(hook)
        return bad

    def is_orthonormal(self, atol: float | None = None) -> bool:
        """Whether rows are orthonormal at every hook (see :meth:`non_orthonormal_hooks`)."""
        return not self.non_orthonormal_hooks(atol)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ConceptSet:
        directions = {h: d.to(device=device, dtype=dtype) for h, d in self.directions.items()}
        return self._derived(directions, self.labels, self.scores, None)

    def validate(self, model: Any) -> ConceptSet:
        """Check every hook exists in ``model.hook_dict`` and its activation's last dimension
        equals the directions' width. Raises a ValueError naming the hook; returns self."""
        check_hook_widths(model, self.widths)
        return self

    # ---- persistence ----------------------------------------------------------------------

    def write_into(self, folder: Path) -> None:
        """Write this set's two files into an existing folder (used by ``save`` and by
        interventions, which store their ConceptSet beside their own files)."""
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "hooks": self.hooks,
            "shapes": {h: list(d.shape) for h, d in self.directions.items()},
            "labels": self.labels,
            "scores": {h: [_score_to_json(x) for x in v] for h, v in self.scores.items()},
            "provenance": self.provenance,
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        write_tensors(self.directions, folder / DIRECTIONS_FILE)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save as a folder (``directions.safetensors`` + ``concepts.json``), atomically."""
        with atomic_folder(path, overwrite) as tmp:
            self.write_into(tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ConceptSet:
        """Load a set saved with :meth:`save` (or the ConceptSet inside a saved intervention)."""
        folder = Path(path)
        what = f"cannot load ConceptSet from {folder}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{what}: no such folder")
        meta = read_json(folder / META_FILE, what)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{what}: {META_FILE} is not a caft-tl concept set")
        try:
            hooks, shapes = list(meta["hooks"]), meta["shapes"]
            labels, scores, provenance = meta["labels"], meta["scores"], meta["provenance"]
        except KeyError as err:
            raise ValueError(f"{what}: {META_FILE} lacks the field {err}") from None
        tensors = read_tensors(folder / DIRECTIONS_FILE, what)
        missing = [h for h in hooks if h not in tensors]
        if missing:
            raise ValueError(f"{what}: {DIRECTIONS_FILE} lacks the hooks {missing}")
        wrong = [h for h in hooks if list(tensors[h].shape) != list(shapes.get(h, []))]
        if wrong:
            raise ValueError(f"{what}: tensor shapes disagree with {META_FILE} at {wrong}")
        scores = {h: [math.nan if x is None else x for x in v] for h, v in scores.items()}
        directions = {h: tensors[h].to(device) for h in hooks}
        return cls(directions, labels, scores, provenance)


def _orthonormal_rows(
    hook: str, d: Tensor, labels: list[str], drop: bool, rtol: float | None
) -> tuple[Tensor, list[int]]:
    """QR of the rows of ``d``; returns orthonormal rows and the input rows they came from."""
    k, width = d.shape
    if rtol is None:
        rtol = max(k, width) * torch.finfo(d.dtype).eps
    # float64 on CPU: exact enough for any input dtype, and the matrices are small.
    work = d.detach().to("cpu", torch.float64)
    tol = rtol * work.norm(dim=1).max().item()
    keep = list(range(k))
    while keep:
        q, r = torch.linalg.qr(work[keep].T)  # q: [d, r], columns orthonormal
        diag = r.diagonal()
        small = (diag.abs() <= tol).nonzero().flatten().tolist()
        if not small and len(keep) > width:
            small = [width]  # the first `width` rows already span everything
        if not small:
            # Sign fix: QR may flip a column; keep each row pointing like its input row.
            q = q * torch.sign(diag)
            return q.T.to(device=d.device, dtype=d.dtype), keep
        bad = keep[small[0]]
        if not drop:
            raise ValueError(
                f"hook {hook!r}: direction {bad} (label {labels[bad]!r}) is (nearly) a linear "
                "combination of the directions before it, so it cannot be orthonormalised; "
                "drop it, or call orthonormalised(drop_dependent=True)"
            )
        keep.remove(bad)
    raise ValueError(f"hook {hook!r}: every direction is zero")
