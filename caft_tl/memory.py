"""How much memory a caft-tl fine-tune needs per device: plan a run before renting GPUs.

:func:`estimate_finetune_memory` counts what :func:`caft_tl.finetune` keeps on each device,
from the model's configuration alone (no weights are loaded):

* **weights**: every parameter in the model's dtype (each DDP rank holds a full replica);
  with ``fsdp`` over ``world_size`` ranks, a ``1 / world_size`` shard plus the whole
  weights of the units being gathered (two blocks, FSDP prefetches the next; or the
  embedding unit if larger);
* **trainable state**: gradients in the model's dtype plus AdamW's two moments (in the
  parameter's dtype, as ``torch.optim.AdamW`` keeps them), for all weights, or for the LoRA
  adapters only; with ``fsdp``, a shard of each, plus one unit's whole gradients before
  they are reduce-scattered;
* **LoRA merged weights**: only for ``lora_form="merged"`` (TransformerLens's own forward,
  ``fast=False``, or one of :mod:`caft_tl.fast`'s fallbacks), which materialises each
  targeted matrix ``W + scale * B A`` per forward and keeps it for the backward pass. The
  default fast components apply adapters in factored form and keep only ``x A^T``;
* **weight copies** kept for the backward pass: TransformerLens projects q / k / v for more
  than 128 tokens per forward through a rearranged copy of ``W_Q``, ``W_K``, ``W_V``; under
  bf16 autocast with float32 weights, every matrix a block multiplies by is cast to a bf16
  copy. Both per block, so with gradient checkpointing only one block's are alive;
* **activations** saved for the backward pass, per token and layer (with
  scaled-dot-product attention nothing quadratic in the sequence is stored): the block input,
  each norm's normalised input and output, q / k / v, attention output, residual midpoint,
  and the MLP's gate, up, activation and product (``6 d_model + 2 q_width + 2 kv_width +
  4 d_mlp`` numbers, ``2 d_mlp`` for an ungated MLP, plus ``r`` per LoRA-adapted matrix;
  bf16 under autocast on GPU, else the model's dtype). With ``gradient_checkpointing`` only
  each block's input is kept, plus one block's intermediates while it is recomputed;
* **logits**: the unembedding of the target positions in float32 and its gradient
  (``2 x targets x d_vocab x 4`` bytes; caft-tl unembeds only the positions that predict a
  target, so this is an upper bound when every token is one).

The parts are summed, which is right for LoRA (measured 6-11% above the live-tensor peak
of a step, ``analyses/benchmarks/bench_scale.py``) and an upper bound for full fine-tuning
(25-80% above), where the logits and activations are freed while the weight gradients
appear. On top of this come the CUDA context and allocator slack (about 1-3 GiB per GPU): the
estimate's ``total`` leaves them out and :meth:`MemoryEstimate.table` says so. Weights,
gradients, AdamW state and LoRA copies match the tensors a real step allocates, byte for
byte, and the saved activations and weight copies match what autograd keeps in a real
forward on CPU to within 15% (``tests/test_memory.py``, tiny models and the embedded one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from caft_tl.fast import PER_HEAD_MAX_ROWS

__all__ = ["MemoryEstimate", "count_parameters", "estimate_finetune_memory"]

GIB = 2**30
QKV = ("W_Q", "W_K", "W_V")


@dataclass
class MemoryEstimate:
    """Bytes per device, by what holds them (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    lora_merged: int
    weight_copies: int
    activations: int
    logits: int
    n_params: int
    n_trainable: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.lora_merged
            + self.weight_copies
            + self.activations
            + self.logits
        )

    def to_dict(self) -> dict[str, Any]:
        parts = ("weights", "gradients", "optimizer", "lora_merged", "weight_copies",
                 "activations", "logits")  # fmt: skip
        return {**{k: getattr(self, k) for k in parts}, "total": self.total,
                "n_params": self.n_params, "n_trainable": self.n_trainable}  # fmt: skip

    def table(self) -> str:
        """A Markdown table in GiB."""
        rows = ["| per device | GiB |", "| --- | ---: |"]
        for key, value in self.to_dict().items():
            if key.startswith("n_"):
                continue
            rows.append(f"| {key.replace('_', ' ')} | {value / GIB:.2f} |")
        rows.append("| (plus CUDA context and allocator slack, about 1-3 GiB per GPU) | |")
        return "\n".join(rows)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _shape(cfg: Any) -> dict[str, int]:
    d_model, n_heads, n_layers = _get(cfg, "d_model"), _get(cfg, "n_heads"), _get(cfg, "n_layers")
    if not all(isinstance(v, int) and v > 0 for v in (d_model, n_heads, n_layers)):
        raise ValueError("the config needs positive integers d_model, n_heads and n_layers")
    d_head = _get(cfg, "d_head") or d_model // n_heads
    n_kv = _get(cfg, "n_key_value_heads") or n_heads
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "q_width": n_heads * d_head,
        "kv_width": n_kv * d_head,
        "d_mlp": _get(cfg, "d_mlp") or 4 * d_model,
        "d_vocab": _get(cfg, "d_vocab"),
        "gated": bool(_get(cfg, "gated_mlp", False)),
        "tied": bool(_get(cfg, "tie_word_embeddings", False)),
    }


def _matrices(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``{TransformerLens weight name: (d_in, d_out)}`` of one block."""
    out = {
        "W_Q": (s["d_model"], s["q_width"]),
        "W_K": (s["d_model"], s["kv_width"]),
        "W_V": (s["d_model"], s["kv_width"]),
        "W_O": (s["q_width"], s["d_model"]),
        "W_in": (s["d_model"], s["d_mlp"]),
        "W_out": (s["d_mlp"], s["d_model"]),
    }
    if s["gated"]:
        out["W_gate"] = (s["d_model"], s["d_mlp"])
    return out


def count_parameters(cfg: Any) -> int:
    """Weights of a decoder-only model from its TransformerLens-style config (a
    ``HookedTransformerConfig``, a model's ``cfg`` or a dict with the same names). Counts
    matrices, biases of q/k/v/o and the MLP (TransformerLens keeps them, zero for Llama-style
    models) and norm weights; a tied unembedding counts once."""
    s = _shape(cfg)
    if not isinstance(s["d_vocab"], int) or s["d_vocab"] < 1:
        raise ValueError("the config needs a positive integer d_vocab")
    block = sum(i * o for i, o in _matrices(s).values())
    block += s["q_width"] + 2 * s["kv_width"] + s["d_model"]  # b_Q, b_K, b_V, b_O
    block += s["d_mlp"] + s["d_model"]  # b_in, b_out
    block += 2 * s["d_model"]  # ln1.w, ln2.w
    return s["n_layers"] * block + _outside_blocks(s)


def _outside_blocks(s: dict[str, int]) -> int:
    """Parameters outside the blocks: embedding, unembedding (and its bias), final norm."""
    unembed = s["d_vocab"] + (0 if s["tied"] else s["d_vocab"] * s["d_model"])
    return s["d_vocab"] * s["d_model"] + unembed + s["d_model"]


def _lora_sizes(s: dict[str, int], lora: Any) -> tuple[int, int]:
    """(adapter parameters, elements of the targeted matrices) over the adapted blocks."""
    mats = _matrices(s)
    unknown = [t for t in lora.targets if t not in mats]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not weights of this model: {sorted(mats)}")
    layers = s["n_layers"] if lora.layers is None else len(lora.layers)
    adapters = sum(lora.r * (mats[t][0] + mats[t][1]) for t in lora.targets)
    targeted = sum(mats[t][0] * mats[t][1] for t in lora.targets)
    return layers * adapters, layers * targeted


def _checked_args(
    batch_size: int, seq_len: int, world_size: Any, lora_form: str, dtype: torch.dtype | str
) -> torch.dtype:
    """Refuse impossible arguments of :func:`estimate_finetune_memory`; the dtype resolved."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError("batch_size and seq_len must be >= 1")
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if lora_form not in ("factored", "merged"):
        raise ValueError(f"lora_form must be 'factored' or 'merged', got {lora_form!r}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return dtype


def _fsdp_counts(
    s: dict[str, Any], n_params: int, n_trainable: int, lora: Any, shards: int
) -> tuple[int, int, int]:
    """Elements of weights, gradients and optimiser state per rank under FSDP: each rank's
    shard plus the largest unit gathered at once (two blocks, or the embeddings)."""
    block = (n_params - _outside_blocks(s)) // s["n_layers"]
    unit = max(2 * block, s["d_vocab"] * s["d_model"] * (1 if s["tied"] else 2))
    trainable_block = n_trainable // s["n_layers"] if lora is not None else block
    weights = -(-n_params // shards) + unit
    gradients = -(-n_trainable // shards) + trainable_block
    optimizer = -(-2 * n_trainable // shards)
    return weights, gradients, optimizer


def estimate_finetune_memory(
    cfg: Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype | str = torch.float32,
    lora: Any = None,
    autocast_bf16: bool | None = None,
    gradient_checkpointing: bool = False,
    lora_form: Literal["factored", "merged"] = "factored",
    fsdp: bool = False,
    world_size: int = 1,
) -> MemoryEstimate:
    """Memory per device of one :func:`caft_tl.finetune` step (single device, or each rank
    under ``torchrun``: DDP replicates the model, FSDP shards it).

    Args:
        cfg: the model's TransformerLens config (``model.cfg``, a ``HookedTransformerConfig``
            or a dict with ``d_model, n_layers, n_heads, d_head, n_key_value_heads, d_mlp,
            d_vocab, gated_mlp, tie_word_embeddings``).
        batch_size: examples per forward (``TrainConfig.batch_size``; gradient accumulation
            does not add activations).
        seq_len: tokens per example (the padded length).
        dtype: the model's parameter dtype (``load_model(dtype=...)``).
        lora: a :class:`caft_tl.LoraConfig` when only adapters train.
        autocast_bf16: activations in bf16 (``finetune`` autocasts on CUDA); default: when
            ``dtype`` is float32, as on a GPU, else activations in ``dtype``.
        gradient_checkpointing: ``TrainConfig.gradient_checkpointing``.
        lora_form: "factored" (the fast components, the default) or "merged" (see the
            module docstring).
        fsdp, world_size: ``TrainConfig.fsdp`` and the number of ranks it shards over.
    """
    dtype = _checked_args(batch_size, seq_len, world_size, lora_form, dtype)
    width = torch.empty((), dtype=dtype).element_size()
    s = _shape(cfg)
    n_params = count_parameters(cfg)
    autocast = (dtype == torch.float32) if autocast_bf16 is None else autocast_bf16
    act_width = 2 if autocast else width
    tokens = batch_size * seq_len
    lora_rank_sum = 0  # numbers of x A^T per token, over one block's adapted matrices
    if lora is None:
        n_trainable, merged = n_params, 0
    else:
        n_trainable, targeted = _lora_sizes(s, lora)
        merged = targeted * width if lora_form == "merged" else 0
        if lora_form == "factored":
            lora_rank_sum = lora.r * len(lora.targets)
    per_token_layer = (
        6 * s["d_model"]  # block input, 2 x (norm's x / rms and its output), residual midpoint
        + 2 * s["q_width"]  # q and the attention output z
        + 2 * s["kv_width"]  # k and v
        + (4 if s["gated"] else 2) * s["d_mlp"]  # gate, up, activation, product
        + lora_rank_sum
    )
    if gradient_checkpointing:
        # The blocks' inputs, plus one block's intermediates while it is recomputed.
        activations = tokens * (s["n_layers"] * s["d_model"] + per_token_layer) * act_width
    else:
        activations = tokens * s["n_layers"] * per_token_layer * act_width
    mats = _matrices(s)
    per_block_copies = 0
    if tokens > PER_HEAD_MAX_ROWS:  # TransformerLens's rearranged q/k/v weights
        per_block_copies += sum(i * o for n, (i, o) in mats.items() if n in QKV) * act_width
    if autocast and width != 2:  # bf16 casts of the block's other matrices
        per_block_copies += sum(i * o for n, (i, o) in mats.items() if n not in QKV) * 2
    copies_alive = 1 if gradient_checkpointing else s["n_layers"]
    weights, gradients, optimizer = n_params, n_trainable, 2 * n_trainable
    if fsdp:
        weights, gradients, optimizer = _fsdp_counts(s, n_params, n_trainable, lora, world_size)
    return MemoryEstimate(
        weights=weights * width,
        gradients=gradients * width,
        optimizer=optimizer * width,
        lora_merged=merged,
        weight_copies=per_block_copies * copies_alive,
        activations=activations,
        logits=2 * tokens * s["d_vocab"] * 4,
        n_params=n_params,
        n_trainable=n_trainable,
    )
