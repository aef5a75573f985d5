"""Low-rank adapters (LoRA) for TransformerLens ``HookedTransformer`` weights.

TransformerLens keeps its weights as bare parameters (``blocks.L.attn.W_Q`` is
``[n_heads, d_model, d_head]``), not ``nn.Linear`` modules, so adapter libraries that wrap
Linear layers do not apply. Here every targeted weight gets a
``torch.nn.utils.parametrize`` parametrisation: reading ``attn.W_Q`` returns
``W + (alpha / r) * delta`` where ``delta`` is ``(B @ A)^T`` in the weight's 2-D
``[in, out]`` view (``W_Q`` as ``[d_model, n_heads * d_head]``, ``W_O`` as
``[n_heads * d_head, d_model]``), reshaped back. ``A`` (``[r, in]``) starts Kaiming-uniform
and ``B`` (``[out, r]``) at zero, so a fresh adapter leaves the model unchanged. All base
parameters are frozen; only ``A`` and ``B`` train.

Every TransformerLens code path keeps working (hooks, ``W_K`` of grouped-query attention,
``model.W_Q``), because the model still reads ``attn.W_Q`` as before. :func:`merge_lora`
removes the parametrisations and leaves plain merged weights, the form to save.

Factored forward: read through the parametrisation, each adapted matrix is materialised
(``W + scale * delta``, a full copy per forward that autograd keeps for the backward pass,
whose gradient for the copy is a full ``[in, out]`` product as in full fine-tuning). The fast
components of :mod:`caft_tl.fast`, which ``load_model`` installs, never do that: they take
the stored weight and the adapter from :func:`factored` and compute
``x @ W + scale * (x @ A^T) @ B^T``, so nothing of the matrix's size is stored or computed
beyond the base product (what makes LoRA on a 32B model fit, see :mod:`caft_tl.memory`).
The two forms are the same function to float rounding (``tests/test_lora.py``); anything
that reads the weight itself (``model.W_Q``, a fallback to TransformerLens's forward for a
hook on attention patterns) sees the merged matrix.

Dropout: a parametrisation never sees the layer's inputs, so ``dropout`` cannot be the
usual input dropout; it drops entries of ``A`` during training (DropConnect on the adapter),
in both forms. Its masks come from the global torch RNG, like ``nn.Dropout``'s.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn.utils import parametrize

from caft_tl._io import dataclass_from_dict

__all__ = [
    "LORA_TARGETS",
    "LoraConfig",
    "LoraDelta",
    "apply_lora",
    "describe_targets",
    "factored",
    "has_lora",
    "load_lora_state_dict",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "merged_forward",
    "merged_view",
]

LORA_TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out")
Layout = Literal["heads_in", "heads_out", "matrix"]
# How each target's parameter maps to a 2-D [in, out] matrix. Grouped-query attention stores
# K and V as `_W_K` / `_W_V` ([n_key_value_heads, d_model, d_head]); `W_K` is a property.
_LAYOUTS: dict[str, Layout] = {
    "W_Q": "heads_in",
    "W_K": "heads_in",
    "W_V": "heads_in",
    "W_O": "heads_out",
    "W_in": "matrix",
    "W_gate": "matrix",
    "W_out": "matrix",
}
# The module attribute where apply_lora records each base parameter's requires_grad flag,
# so merge_lora can give the merged model back as trainable as it came.
_FLAGS_ATTR = "_caft_lora_requires_grad"


@dataclass
class LoraConfig:
    """Which weights get adapters, and their rank / scale.

    ``targets`` are TransformerLens weight names (``W_K`` / ``W_V`` also cover the grouped
    ``_W_K`` / ``_W_V``); ``layers`` are block indices (``None``: all blocks). The update is
    scaled by ``alpha / r``.

    Args:
        r: the adapters' rank.
        alpha: the scale numerator (the update is ``alpha / r * B A``).
        targets: weights that get adapters.
        layers: blocks that get adapters (None: all).
        dropout: dropout on the adapters' input while training (0: none).
    """

    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    layers: tuple[int, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)  # lists from JSON
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoRA r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise ValueError(f"LoRA alpha must be a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"unknown LoRA target(s) {bad or '(none given)'}; valid targets: "
                f"{', '.join(LORA_TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets repeat a name: {self.targets}")
        if self.layers is not None and not (
            self.layers
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)
            and len(set(self.layers)) == len(self.layers)
        ):
            raise ValueError(
                f"LoRA layers must be distinct block indices >= 0 or None, got {self.layers!r}"
            )
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        # Lists, as JSON gives them back: a saved config must compare equal to a fresh one.
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        return dataclass_from_dict(cls, d)


# --------------------------------------------------------------------------------------------
# The parametrisation
# --------------------------------------------------------------------------------------------


def _in_out(shape: torch.Size, layout: Layout) -> tuple[int, int]:
    if layout == "heads_in":  # [heads, d_model, d_head]: in d_model, out heads * d_head
        return shape[1], shape[0] * shape[2]
    if layout == "heads_out":  # [heads, d_head, d_model]: in heads * d_head, out d_model
        return shape[0] * shape[1], shape[2]
    return shape[0], shape[1]


def _to_layout(
    delta: Float[Tensor, "d_in d_out"], shape: torch.Size, layout: Layout
) -> Float[Tensor, "..."]:
    """Reshape a 2-D ``[in, out]`` update into the parameter's own shape."""
    if layout == "heads_in":
        heads, d_in, d_head = shape
        return delta.reshape(d_in, heads, d_head).permute(1, 0, 2)
    return delta.reshape(shape)  # heads_out flattens (heads, d_head) as its rows already


class LoraDelta(nn.Module):
    """``W -> W + scale * (B @ A)^T`` in W's layout; a parametrisation for one weight."""

    def __init__(
        self,
        weight: Tensor,
        layout: Layout,
        cfg: LoraConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        d_in, d_out = _in_out(weight.shape, layout)
        self.layout, self.scale, self.dropout = layout, cfg.scale, cfg.dropout
        self.shape = weight.shape
        a = torch.empty(cfg.r, d_in, dtype=weight.dtype)
        # PEFT's default init: Kaiming-uniform with a = sqrt(5), on CPU so a generator works.
        bound = math.sqrt(6.0 / ((1 + 5.0) * d_in))
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a.to(weight.device))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r, dtype=weight.dtype, device=weight.device))

    def _a(self, dropout: bool = True) -> Tensor:
        if dropout and self.dropout and self.training:
            return F.dropout(self.A, self.dropout)
        return self.A

    def delta(self, dropout: bool = True) -> Float[Tensor, "..."]:
        """The update in the weight's shape; ``dropout=False`` for merging."""
        return _to_layout((self.B @ self._a(dropout)).mT * self.scale, self.shape, self.layout)

    def project(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """``scale * (x @ A^T) @ B^T``: the update applied to inputs in the 2-D ``[in, out]``
        view, without forming it (``x @ delta`` to rounding). Only ``x @ A^T`` (``r`` wide)
        is kept for the backward pass."""
        return F.linear(F.linear(x, self._a()) * self.scale, self.B)

    def add_to(
        self, out: Float[Tensor, "rows d_out"], x: Float[Tensor, "rows d_in"]
    ) -> Float[Tensor, "rows d_out"]:
        """``out += project(x)`` in place, one fused product: no ``[rows, d_out]``
        temporaries (``out`` is a fresh product of the base weight; autograd allows it,
        since that product's backward does not read its output). Under autocast ``out`` is
        bf16 and an in-place product is not autocast, so the factors are cast to it."""
        xa = F.linear(x, self._a()) * self.scale
        return out.addmm_(xa.to(out.dtype), self.B.mT.to(out.dtype))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta()

    def extra_repr(self) -> str:
        return f"r={self.A.shape[0]}, layout={self.layout!r}, scale={self.scale}"


# --------------------------------------------------------------------------------------------
# Applying, merging, listing
# --------------------------------------------------------------------------------------------


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None


def _targets(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module, str, Layout]]:
    """(module path, module, parameter name, layout) for every weight the config targets."""
    n_layers = len(getattr(model, "blocks", []))
    if cfg.layers is not None and any(i >= n_layers for i in cfg.layers):
        raise ValueError(f"LoRA layers {list(cfg.layers)} out of range: the model has {n_layers}")
    found = []
    for path, module in model.named_modules():
        layer = _block_index(path)
        if layer is None or (cfg.layers is not None and layer not in cfg.layers):
            continue
        own = dict(module.named_parameters(recurse=False))
        for target in cfg.targets:
            name = target if target in own else f"_{target}" if f"_{target}" in own else None
            if name is not None and own[name].ndim == (2 if _LAYOUTS[target] == "matrix" else 3):
                found.append((path, module, name, _LAYOUTS[target]))
    if not found:
        raise ValueError(
            f"no weight of the model matches the LoRA targets {list(cfg.targets)} in layers "
            f"{'all' if cfg.layers is None else list(cfg.layers)}; valid targets: "
            f"{', '.join(LORA_TARGETS)}"
        )
    return found


# Whether the fast components apply adapters in factored form (see merged_forward).
_FACTORED = [True]


@contextmanager
def merged_forward() -> Iterator[None]:
    """Inside the ``with`` block the fast components read adapted weights merged, as
    TransformerLens's own forward does: the same function, to compare memory and speed of
    the two forms (``analyses/benchmarks/bench_scale.py``)."""
    before = _FACTORED[0]
    _FACTORED[0] = False
    try:
        yield
    finally:
        _FACTORED[0] = before


def factored(module: nn.Module, name: str) -> tuple[Tensor, LoraDelta | None]:
    """A weight as stored and its LoRA adapter, *without* merging them (the factored form,
    see the module docstring); ``(getattr(module, name), None)`` for a weight without one,
    or for every weight inside :func:`merged_forward`."""
    if _FACTORED[0] and parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        if len(plist) == 1 and isinstance(plist[0], LoraDelta):
            return plist.original, plist[0]
    return getattr(module, name), None


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraDelta) for m in model.modules())


def apply_lora(
    model: nn.Module, cfg: LoraConfig | None = None, *, generator: torch.Generator | None = None
) -> nn.Module:
    """Add LoRA adapters in place and freeze every other parameter; returns ``model``.

    ``generator`` seeds the ``A`` matrices (``B`` is zero, so the model is unchanged)."""
    cfg = cfg or LoraConfig()
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_lora(model) first")
    targets = _targets(model, cfg)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for _, module, name, _ in targets:
        if parametrize.is_parametrized(module, name):
            raise ValueError(f"{name} of {type(module).__name__} is already parametrised")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, module, name, layout in targets:
        delta = LoraDelta(getattr(module, name), layout, cfg, generator)
        parametrize.register_parametrization(module, name, delta, unsafe=True)
    setattr(model, _FLAGS_ATTR, flags)
    return model


def _lora_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LoraDelta]]:
    """(module path, module, weight name, adapter) for every adapted weight, in model order."""
    for path, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, LoraDelta):
                    yield path, module, name, p


def _own_class(module: nn.Module) -> None:
    """Give a parametrised module a class of its own before its parametrisations change.

    ``register_parametrization`` puts the weights' properties on a class generated for the
    module, but ``copy.deepcopy`` gives the copy that same class, so removing a copy's
    parametrisation would delete the property from the original too."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and remove the parametrisations, in place.

    The merged weights are new plain parameters (an original shared with another model is
    never written), and every parameter gets back the ``requires_grad`` flag it had before
    :func:`apply_lora`. Safe on a deep copy of a LoRA model: the original keeps working."""
    flags: dict[str, bool] | None = model.__dict__.pop(_FLAGS_ATTR, None)
    for _, module, name, adapter in list(_lora_slots(model)):
        with torch.no_grad():
            merged = module.parametrizations[name].original + adapter.delta(dropout=False)
        _own_class(module)
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        setattr(module, name, nn.Parameter(merged, requires_grad=False))
    if flags is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))
    return model


def merged_view(model: nn.Module) -> nn.Module:
    """A plain model with the adapters merged, for saving or evaluating a LoRA model.

    It *shares* every tensor but the merged weights with ``model`` (no second copy of the
    base in memory), so never train it; ``model`` is left as it was."""
    shared: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        shared[id(tokenizer)] = tokenizer
    view = copy.deepcopy(model, memo=shared)
    view.__dict__.pop(_FLAGS_ATTR, None)  # the shared parameters keep their flags
    return merge_lora(view)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' ``A`` and ``B`` matrices, in a fixed order (for an optimiser)."""
    return [p for _, _, _, adapter in _lora_slots(model) for p in (adapter.A, adapter.B)]


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"blocks.0.attn.W_Q.lora_A": A, ...lora_B: B}``, detached (for checkpoints)."""
    out = {}
    for path, _, name, adapter in _lora_slots(model):
        out[f"{_key(path, name)}.lora_A"] = adapter.A.detach()
        out[f"{_key(path, name)}.lora_B"] = adapter.B.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy adapter matrices saved by :func:`lora_state_dict` into ``model``'s adapters;
    the key sets and shapes must match exactly (a different config fails loudly)."""
    slots = {
        f"{_key(path, name)}.lora_{which}": getattr(adapter, which)
        for path, _, name, adapter in _lora_slots(model)
        for which in ("A", "B")
    }
    missing, unexpected = sorted(set(slots) - set(state)), sorted(set(state) - set(slots))
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights do not match the model's adapters (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    for key, param in slots.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(
                f"LoRA weight {key} has shape {tuple(state[key].shape)}, the adapter "
                f"{tuple(param.shape)}"
            )
    with torch.no_grad():
        for key, param in slots.items():
            param.copy_(state[key])


def describe_targets(model: nn.Module) -> list[str]:
    """Names of the adapted weights (``blocks.0.attn._W_K`` ...), for logs and errors."""
    return [_key(path, name) for path, _, name, _ in _lora_slots(model)]
