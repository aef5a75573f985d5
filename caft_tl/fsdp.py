"""Fully sharded data parallel (FSDP2) training of a ``HookedTransformer`` under ``torchrun``.

With ``TrainConfig(fsdp=True)`` under ``torchrun``, :func:`caft_tl.finetune` shards the model
with ``torch.distributed.fsdp.fully_shard`` instead of replicating it with DDP: parameters,
gradients and AdamW state are split over the ranks, and each unit's weights are gathered
only while it runs. The units are every transformer block, ``ln_final``, the embedding
together with the unembedding (one unit, so tied embeddings stay one matrix), and the root
(what is left, e.g. positional embeddings). TransformerLens code keeps working inside a
unit's forward (hooks, the fast paths, LoRA in factored form), because FSDP swaps the full
tensors in while the unit runs. ``torch.distributed.checkpoint`` is not needed: checkpoints
gather full tensors to rank 0 and have the very format of a single-process run, so a run can
resume with or without sharding, at any number of ranks.

:class:`ShardedModel` also keeps a *shell* of the model: a deep copy whose parameters live on
the ``meta`` device (no memory), made before sharding. Gathered full weights are assigned
into it to save checkpoints and to give back a plain ``HookedTransformer`` at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from caft_tl import distributed as dist

__all__ = ["ShardedModel"]


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def full(t: Tensor) -> Tensor:
    """The whole tensor behind a sharded one (a collective: every rank must call it in the
    same order); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, _dtensor()) else t


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (a whole tensor, the same on every rank) laid out as ``like``: this rank's
    shard when ``like`` is sharded."""
    if not isinstance(like, _dtensor()):
        return value.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    local = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements)


class ShardedModel:
    """A model sharded in place over the ranks, with a meta-device shell for gathering."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.model = model
        # The shell shares nothing with the model but its tokenizer; its parameters take no
        # memory until gathered weights are assigned into it.
        memo: dict[int, Any] = {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()
        }
        if getattr(model, "tokenizer", None) is not None:
            memo[id(model.tokenizer)] = model.tokenizer
        self.shell = copy.deepcopy(model, memo)
        self._meta = {n: p for n, p in self.shell.named_parameters()}
        mesh = init_device_mesh(device.type, (dist.world_size(),))
        fully_shard(model.ln_final, mesh=mesh)
        fully_shard([model.embed, model.unembed], mesh=mesh)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # moves every shard to ``device``

    def gather(self, everyone: bool = True) -> nn.Module | None:
        """The shell holding the whole current weights on CPU, on every rank (or on rank 0
        only, ``None`` elsewhere). A collective: every rank must call it."""
        keep = everyone or dist.is_main()
        state = {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                whole = full(p.detach())  # one parameter at a time on the device
                if keep:
                    state[name] = nn.Parameter(whole.cpu(), p.requires_grad)
        if not keep:
            return None
        self._assign(state)
        self.shell.cfg.device = "cpu"  # where TransformerLens's forward sends the tokens
        return self.shell

    def release(self) -> None:
        """Drop the gathered weights from the shell (back to the meta device)."""
        self._assign(self._meta)

    def _assign(self, state: Mapping[str, Tensor]) -> None:
        missing, unexpected = self.shell.load_state_dict(state, strict=False, assign=True)
        names = set(self._meta)
        if unexpected or names & set(missing):
            raise RuntimeError(f"gathered weights do not fit the model ({unexpected[:3]})")

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """``optimizer.state_dict()`` with whole tensors, on rank 0 (``None`` elsewhere)."""
        sd = optimizer.state_dict()
        state = {
            index: {k: full(v).cpu() if isinstance(v, Tensor) else v for k, v in values.items()}
            for index, values in sd["state"].items()
        }
        return {**sd, "state": state} if dist.is_main() else None

    @staticmethod
    def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: Mapping[str, Any]) -> None:
        """Load a whole-tensor optimizer state (as :meth:`optimizer_state` or a single
        process saves it) into an optimizer over sharded parameters."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = [i for group in sd["param_groups"] for i in group["params"]]
        if len(ids) != len(params):
            raise ValueError("the saved optimizer state is for another set of parameters")
        by_id = dict(zip(ids, params, strict=True))
        state = {}
        for index, values in sd["state"].items():
            param = by_id[index]
            state[index] = {
                k: shard_like(v, param) if isinstance(v, Tensor) and v.ndim > 0 else v
                for k, v in values.items()
            }
        optimizer.load_state_dict({**sd, "state": state})
