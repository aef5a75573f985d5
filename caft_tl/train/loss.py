"""The loss: cross-entropy over target tokens only (``loss_mask[t] == 1``: the prediction
at ``t - 1`` is trained), unembedding only the positions that predict a target, with a
cheaper backward of the same bits; the autocast and gradient-checkpointing contexts of a
step; the evaluation loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from torch.autograd.function import once_differentiable
from transformer_lens import HookedTransformer

from caft_tl.data.chat import pad_id, prepare_data
from caft_tl.models import logits_from_residual
from caft_tl.train.plan import micro_batches, trainable_rows

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike


_IGNORED = -100  # F.cross_entropy's and nll_loss's default ignore_index


class _SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, labels, reduction="sum")`` with the same forward and the
    same gradient bits, one ``[rows, vocab]`` tensor lighter backward.

    PyTorch's backward writes the loss gradient into a zeroed ``[rows, vocab]`` tensor
    (``nll_loss``) and then the log-softmax gradient into a second, fresh one. Here the
    log-softmax backward kernel writes over the first (its ``out=`` aliases its
    ``grad_output``: each row's sum is read before the row is written), so the step skips
    allocating, page-faulting and filling about 100 MB for SmolLM2 at 8 x 64 targets. The
    kernel itself computes the gradient, because its ``exp`` rounds differently from
    ``torch.exp``. CPU only (the aliasing is checked there, ``tests/test_train.py``)."""

    @staticmethod
    def forward(
        ctx: Any, logits: Float[Tensor, "rows vocab"], labels: Int[Tensor, " rows"]
    ) -> Float[Tensor, ""]:
        log_probs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_probs, labels)
        return F.nll_loss(log_probs, labels, reduction="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Float[Tensor, ""]) -> tuple[Tensor, None]:
        log_probs, labels = ctx.saved_tensors
        out = torch.zeros_like(log_probs)
        hit = labels != _IGNORED  # nll_loss's backward: -grad at each counted label
        rows = torch.arange(len(labels), device=out.device)[hit]
        out[rows, labels[hit]] = -grad
        torch._log_softmax_backward_data(out, log_probs, -1, log_probs.dtype, out=out)
        return out, None


def cross_entropy_sum(
    logits: Float[Tensor, "rows vocab"], labels: Int[Tensor, " rows"]
) -> Float[Tensor, ""]:
    """Summed cross-entropy of ``logits`` against ``labels``: the bits of
    ``F.cross_entropy(logits, labels, reduction="sum")`` (labels of -100 are skipped, as
    there); for float32 / float64 logits on CPU with gradients on, a backward that allocates
    one ``[rows, vocab]`` tensor instead of two."""
    lighter = logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)
    if not (lighter and torch.is_grad_enabled() and logits.requires_grad):
        return F.cross_entropy(logits, labels, reduction="sum")
    return _SummedCrossEntropy.apply(logits, labels)


def masked_loss_sum(
    logits: Float[Tensor, "batch pos vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> tuple[Float[Tensor, ""], int]:
    """Summed cross-entropy over target tokens, and their count (with the shift:
    position ``t - 1`` predicts token ``t`` wherever ``loss_mask[t] == 1``)."""
    targets = loss_mask[:, 1:].bool()
    picked = logits[:, :-1][targets].float()  # only target rows reach the softmax
    return cross_entropy_sum(picked, input_ids[:, 1:][targets]), int(targets.sum())


def target_loss_sum(
    model: HookedTransformer,
    batch: Mapping[str, Tensor],
    forward: Callable[..., Tensor] | None = None,
) -> tuple[Float[Tensor, ""], int]:
    """:func:`masked_loss_sum` of the model on ``batch``, unembedding only the positions
    that predict a target.

    The same numbers as the full forward, cheaper: with one target per example (multiple
    choice) the ``[batch, pos, vocab]`` logits, about 12% of a SmolLM2 step and most of its
    activation memory, shrink to ``[targets, vocab]``. ``ln_final`` and ``unembed`` (and any
    hooks on them) see the target positions only, as a ``[1, targets, d_model]`` batch.
    ``forward``: what runs the blocks (a ``DistributedDataParallel`` wrapping ``model``).
    """
    targets = batch["loss_mask"][:, 1:].bool()
    # The attention mask is explicit: the pad id may be a real token (SmolLM2's <|im_end|>).
    resid = (forward or model)(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        stop_at_layer=model.cfg.n_layers,
    )
    logits = logits_from_residual(model, resid[:, :-1][targets].unsqueeze(0))
    labels = batch["input_ids"][:, 1:][targets]
    # squeeze, not [0]: indexing's backward writes the gradient into a zeroed copy of the
    # [1, targets, vocab] logits (a full extra pass over the largest tensor of the step).
    return cross_entropy_sum(logits.squeeze(0).float(), labels), int(targets.sum())


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; no autocast on other devices."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def checkpointed_blocks(model: HookedTransformer) -> Iterator[HookedTransformer]:
    """Activation (gradient) checkpointing of every transformer block, for a ``with`` block.

    Each block's forward runs without keeping its intermediates when gradients are on, and
    runs again during the backward pass (``torch.utils.checkpoint``, non-reentrant: the RNG
    state, autocast and hooks replay as in the first run). Hooks inside a block therefore
    fire twice per training forward; interventions are pure functions of the activation, so
    the update does not change, but a hook that *records* would record twice. The blocks'
    own forwards come back however the block exits."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def checkpointed(*args: Any, **kwargs: Any) -> Tensor:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return checkpointed

    blocks = list(model.blocks)
    if any("forward" in vars(b) for b in blocks):
        raise RuntimeError("the model's blocks are already checkpointed")
    try:
        for block in blocks:
            block.forward = wrap(block.forward)  # an instance attribute shadows the class's
        yield model
    finally:
        for block in blocks:
            vars(block).pop("forward", None)


@torch.no_grad()
def mean_target_loss(
    model: HookedTransformer, ids: list[list[int]], masks: list[list[int]], batch_size: int
) -> float:
    """Mean cross-entropy over the target tokens of tokenised rows, in eval mode."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in micro_batches(
            ids, masks, list(range(len(ids))), batch_size, pad_id(model.tokenizer), device
        ):
            with autocast_for(device):
                loss, n = target_loss_sum(model, batch)
            total, count = total + loss.item(), count + n
    finally:
        model.train(was_training)
    return total / count


def evaluate_loss(
    model: HookedTransformer,
    data: Any,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    intervention: InterventionLike | None = None,
) -> float:
    """Mean cross-entropy over the target tokens of ``data`` (same rules as training)."""
    ids, masks = trainable_rows(prepare_data(data, model.tokenizer, max_length=max_length))
    with applied(intervention, model):
        return mean_target_loss(model, ids, masks, batch_size)


def applied(intervention: InterventionLike | None, model: HookedTransformer):
    """The intervention's hooks for a ``with`` block (removed however it exits), or nothing."""
    return nullcontext() if intervention is None else intervention.applied(model)
