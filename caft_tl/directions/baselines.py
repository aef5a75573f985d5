"""Control ConceptSets for CAFT experiments: random directions, top-k and random subsets.

CAFT results mean something only against controls: ablating as many random directions
(does any ablation help?), the top-scored directions without interpretation (is picking
them by hand needed?), or a random subset of the candidates. Every baseline records its
own parameters and its parent's provenance, so a saved control says what it controls for.
"""

from __future__ import annotations

import hashlib
import math
import operator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from caft_tl.directions.concepts import ConceptSet, make_provenance

__all__ = ["random_directions", "random_subset", "top_k"]


def _generator(seed: int, hook: str) -> torch.Generator:
    # One stream per (seed, hook): a hook's baseline does not change when other hooks are
    # added or dropped. sha256, not hash(): Python salts string hashes per process.
    digest = hashlib.sha256(f"{int(seed)}:{hook}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _provenance(method: str, parent: ConceptSet, **parameters: Any) -> dict[str, Any]:
    prov = make_provenance(method, model=parent.provenance.get("model"), **parameters)
    prov["baseline"] = method
    prov["parent"] = parent.provenance
    return prov


def _check_count(name: str, n: int) -> int:
    try:  # operator.index accepts numpy and torch integers, not floats
        value = operator.index(n)
    except TypeError:
        value = None
    if value is None or isinstance(n, bool):
        raise TypeError(f"{name} must be an integer, got {n!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _random_orthonormal(k: int, d: int, gen: torch.Generator) -> Float[Tensor, "k d"]:
    """``k`` Haar-distributed orthonormal rows in ``R^d`` (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    # Fixing R's diagonal positive makes Q unique, hence uniformly distributed.
    return (q * torch.sign(r.diagonal())).T


def random_directions(like: ConceptSet, *, seed: int = 0) -> ConceptSet:
    """Random orthonormal directions with the hooks, counts, widths, dtype and device of
    ``like``: the "any ablation of that size" control. Seeded and reproducible."""
    directions, labels = {}, {}
    for hook, d in like.directions.items():
        k, width = d.shape
        if k > width:
            raise ValueError(
                f"hook {hook!r}: {k} orthonormal directions do not fit in width {width}"
            )
        q = _random_orthonormal(k, width, _generator(seed, hook))
        directions[hook] = q.to(device=d.device, dtype=d.dtype)
        labels[hook] = [f"random{i}" for i in range(k)]
    return ConceptSet(
        directions, labels, provenance=_provenance("random_directions", like, seed=seed)
    )


def _subset(
    concepts: ConceptSet, picks: dict[str, list[int]], provenance: dict[str, Any]
) -> ConceptSet:
    return ConceptSet(
        {h: concepts[h][idx] for h, idx in picks.items()},
        labels={h: [concepts.labels[h][i] for i in idx] for h, idx in picks.items()},
        scores={h: [concepts.scores[h][i] for i in idx] for h, idx in picks.items()},
        provenance=provenance,
    )


def _check_available(concepts: ConceptSet, name: str, n: int) -> None:
    for hook, d in concepts.directions.items():
        if n > d.shape[0]:
            raise ValueError(f"{name}={n} but hook {hook!r} has only {d.shape[0]} directions")


def top_k(concepts: ConceptSet, k: int) -> ConceptSet:
    """The ``k`` highest-scored directions at each hook, highest first (ties keep the
    original order): the "no interpretation, just the strongest" control."""
    k = _check_count("k", k)
    _check_available(concepts, "k", k)
    picks = {}
    for hook, scores in concepts.scores.items():
        if any(math.isnan(s) for s in scores):
            raise ValueError(f"hook {hook!r} has unscored (NaN) directions; top_k ranks by score")
        order = torch.tensor(scores, dtype=torch.float64).argsort(descending=True, stable=True)
        picks[hook] = order[:k].tolist()
    return _subset(concepts, picks, _provenance("top_k", concepts, k=k, indices=picks))


def random_subset(concepts: ConceptSet, n: int, *, seed: int = 0) -> ConceptSet:
    """``n`` directions drawn without replacement at each hook (kept in their original
    order): the "random candidates instead of chosen ones" control. Seeded."""
    n = _check_count("n", n)
    _check_available(concepts, "n", n)
    picks = {}
    for hook, d in concepts.directions.items():
        drawn = torch.randperm(d.shape[0], generator=_generator(seed, hook))[:n]
        picks[hook] = sorted(drawn.tolist())
    return _subset(
        concepts, picks, _provenance("random_subset", concepts, n=n, seed=seed, indices=picks)
    )
