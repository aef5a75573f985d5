"""Data-parallel training on ``torch.distributed``: process groups started by ``torchrun``.

Under ``torchrun --nproc_per_node=N`` every process runs the same script; :func:`setup` joins
the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``), with NCCL on GPUs and gloo on CPUs.
:func:`caft_tl.finetune` then trains through ``DistributedDataParallel`` (or sharded with
FSDP, ``TrainConfig(fsdp=True)``, see :mod:`caft_tl.fsdp`): each rank takes
its share of every step's examples, the intervention hooks are installed on every rank, and
the update is the one a single process would make with the same global batch (the loss is
normalised by the whole step's target count, and gradients are summed over ranks). Only
rank 0 writes metrics, checkpoints and the final model; every rank reads the checkpoint to
resume.

:func:`caft_tl.cache_activations` and :func:`caft_tl.activation_diff` split their batches
over the ranks too: each rank runs a contiguous share and the shards merge, in order, into the
very result one process writes.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "broadcast_object",
    "check_on_main",
    "device",
    "gather_objects",
    "is_distributed",
    "is_main",
    "main_first",
    "my_range",
    "rank",
    "setup",
    "sum_over_ranks",
    "world_size",
]


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and logs."""
    return rank() == 0


def setup(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group ``torchrun`` set up in the environment, if there is one.

    Returns whether this process is now part of a group with more than one rank. Safe to
    call twice and outside ``torchrun`` (returns ``False``). ``backend`` defaults to NCCL
    when CUDA is available, else gloo; with NCCL each rank uses GPU ``LOCAL_RANK``.
    """
    if is_distributed():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the run with "
            "torchrun (e.g. torchrun --nproc_per_node=2 -m caft_tl.cli finetune ...)"
        )
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under NCCL, else CPU (or the only GPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sum_over_ranks(value: float) -> float:
    """``value`` summed over every rank (the value itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` without a group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def my_range(n: int) -> range:
    """This rank's contiguous share of ``range(n)`` (shares differ in length by at most
    one; concatenated in rank order they are ``range(n)``)."""
    return range(rank() * n // world_size(), (rank() + 1) * n // world_size())


def check_on_main(check: Any) -> None:
    """Run ``check()`` on rank 0 only and raise its error (if any) on every rank, so no rank
    goes on alone and no rank inspects files rank 0 is about to write."""
    error = None
    if is_main():
        try:
            check()
        except Exception as exc:  # re-raised on every rank below
            error = exc
    error = broadcast_object(error)
    if error is not None:
        raise error


def _collective_device() -> torch.device:
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


@contextmanager
def main_first():
    """Rank 0 runs the body first (e.g. converting a model into the cache), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
