"""Concept probes: difference-of-means directions from two contrasting sets of texts.

A probe is a read-out, not something to ablate: e.g. the female-minus-male direction from
:func:`caft_tl.tasks.gender_contrast` tells whether an intervention moves the model towards
one side (see :func:`caft_tl.diagnostics.ablation_shift`). Same recipe as persona vectors:
mean activation over the tokens of set ``a`` minus that over set ``b``, per hook.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformer_lens import HookedTransformer

from caft_tl.activations import check_hooks
from caft_tl.directions.concepts import ConceptSet, make_provenance

__all__ = ["mean_difference"]


def _batches(model: HookedTransformer, texts: Sequence[str], batch_size: int, skip_first: bool):
    from caft_tl.data import mask_batches

    if not texts:
        raise ValueError("mean_difference needs texts on both sides, got an empty list")
    return mask_batches(
        list(texts), model.tokenizer, batch_size, max_length=model.cfg.n_ctx, skip_first=skip_first
    )


def mean_difference(
    model: HookedTransformer,
    a: Sequence[str],
    b: Sequence[str],
    hooks: Sequence[str] | str,
    *,
    label: str = "a-b",
    normalise: bool = True,
    skip_first: bool = True,
    batch_size: int = 16,
) -> ConceptSet:
    """One direction per hook: the mean activation over the tokens of ``a`` minus that over
    ``b`` (unit length with ``normalise``; its norm is kept in the set's scores)."""
    from caft_tl.activations import mean_activations

    if isinstance(a, str) or isinstance(b, str):
        raise TypeError("a and b are lists of texts, not single strings")
    hooks = check_hooks(model, hooks)
    mu_a = mean_activations(model, hooks, _batches(model, a, batch_size, skip_first))
    mu_b = mean_activations(model, hooks, _batches(model, b, batch_size, skip_first))
    directions, scores = {}, {}
    for hook in hooks:
        diff = (mu_a[hook] - mu_b[hook]).to(torch.float32)
        norm = float(diff.norm())
        if norm == 0:
            raise ValueError(f"the two sets have the same mean at {hook!r}: no direction")
        directions[hook] = (diff / norm if normalise else diff)[None]
        scores[hook] = [norm]
    provenance = make_provenance(
        "mean_difference", model=model, data=[list(a), list(b)], n_a=len(a), n_b=len(b)
    )
    return ConceptSet(
        directions, labels={h: [label] for h in hooks}, scores=scores, provenance=provenance
    )
