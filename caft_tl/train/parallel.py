"""Data parallelism under ``torchrun``: the DDP wrapper, each rank's share of a step and
when gradients are exchanged."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

from transformer_lens import HookedTransformer

from caft_tl import distributed as dist


def gradient_sync(ddp: Any, sharded: Any, last: bool) -> Any:
    """A context for one micro-batch's backward: gradients are exchanged only on the last
    of a step (``ddp``: the DDP wrapper; ``sharded``: the FSDP-sharded model)."""
    if sharded is not None:
        sharded.set_requires_gradient_sync(last)
    if ddp is None or last:
        return nullcontext()
    return ddp.no_sync()


def data_parallel(model: HookedTransformer) -> Any:
    """``DistributedDataParallel`` over ``model`` under torchrun, else ``None``."""
    if not dist.is_distributed():
        return None
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # Buffers (rotary tables, causal masks) are constants: syncing them every forward would
    # move tens of MB for nothing. Construction broadcasts rank 0's weights once. (Newer
    # torch renames the switch and deprecates the old name.)
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False}
    )


def rank_share(index: list[int]) -> tuple[list[int], float]:
    """This rank's examples of a step and the weight of its loss. A rank left without an
    example (a short last step) runs one with weight 0, so every rank joins the exchange."""
    if not dist.is_distributed():
        return index, 1.0
    mine = index[dist.rank() :: dist.world_size()]
    return (mine, float(dist.world_size())) if mine else (index[:1], 0.0)
