"""What autograd keeps for a backward pass: a CPU stand-in for GPU peak-memory counters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_bytes(model: torch.nn.Module, fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the bytes autograd saved for its backward pass, beyond the
    model's own parameters and buffers (each storage once, so views are not counted twice)."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())
