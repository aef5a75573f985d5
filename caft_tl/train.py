"""Fine-tuning a HookedTransformer, optionally with an intervention (CAFT) active.

Read top to bottom: the config, data preparation, the loss, the schedule, checkpoints, and
:func:`finetune`, whose loop is one screen long.

Conventions:

- One *step* is one optimiser update over ``batch_size * grad_accum`` examples, split into
  ``grad_accum`` micro-batches. The loss of a step is the mean cross-entropy over all its
  target tokens (not a mean of micro-batch means), so accumulation gives the update of one
  big batch.
- ``loss_mask[t] == 1`` means token ``t`` is a target (the data layer's convention): the
  prediction at position ``t - 1`` is trained.
- The intervention's hooks are installed for each training step with ``with
  intervention.applied(model)`` and removed before evaluation and saving, however the step
  ends.
- ``out/`` holds ``run.json`` (config + data fingerprint), ``metrics.jsonl`` (one line per
  step), ``checkpoint/`` (weights in :func:`caft_tl.models.save_model` format, loadable with
  ``load_model``, plus optimiser, scheduler and RNG states), ``step-N/`` snapshots for the
  steps in ``cfg.keep_checkpoints`` and ``final/`` (the model).
- With ``cfg.lora`` only low-rank adapters train (:mod:`caft_tl.lora`); every saved model
  (checkpoint, snapshots, final) is the merged plain model, and the returned model is merged
  too. The checkpoint also holds the adapters (``lora.safetensors``) for resuming, which
  needs the same base model (checked by a fingerprint of its weights).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl import distributed as dist
from caft_tl._io import atomic_folder, dataclass_from_dict, read_json, read_tensors, write_tensors
from caft_tl.data.chat import (
    DataError,
    DataWarning,
    collate,
    pad_id,
    prepare_data,
    tokenize_prompt_answer,
)
from caft_tl.fsdp import full
from caft_tl.lora import (
    LoraConfig,
    apply_lora,
    has_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    merged_view,
)
from caft_tl.models import logits_from_residual, save_model

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike

__all__ = [
    "TrainConfig",
    "checkpointed_blocks",
    "evaluate_loss",
    "finetune",
    "lr_factor",
    "masked_loss_sum",
    "target_loss_sum",
    "prepare_data",
    "tokenize_prompt_answer",
]

Schedule = Literal["linear", "cosine", "constant"]
SCHEDULES = ("linear", "cosine", "constant")
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
LORA_FILE = "lora.safetensors"
RUN_FORMAT = "caft_tl.train_run"
# Config fields that may change when resuming: they do not change the weights.
RESUMABLE_CHANGES = frozenset(
    {
        "progress",
        "device",
        "save_every",
        "eval_every",
        "keep_checkpoints",
        "gradient_checkpointing",
        "fsdp",
        "in_place",
    }
)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that determines a fine-tuning run (saved as JSON beside its checkpoints).

    ``max_steps``, when set, overrides ``epochs`` (the data is cycled, reshuffled per epoch).
    Warm-up is ``warmup_steps`` or ``warmup_ratio`` of the total steps (not both). Weight
    decay applies to matrices only (not to norm weights or biases). ``lora`` trains low-rank
    adapters instead of all weights; ``keep_checkpoints`` lists steps whose model is kept
    as ``out/step-N/`` (e.g. for a "learned less" control: a plain run stopped early).
    ``gradient_checkpointing`` recomputes each block's forward during the backward pass
    (see :func:`checkpointed_blocks`): activation memory drops from every block's
    intermediates to the blocks' inputs, for about one more forward of compute; the update
    is the same, so a run may resume with it switched. ``fsdp`` shards the model over the
    ranks under ``torchrun`` instead of replicating it (:mod:`caft_tl.fsdp`); it does
    nothing in a single process, and checkpoints are the same either way.
    A step sees ``batch_size * grad_accum`` examples, in forwards of at most ``batch_size``;
    under ``torchrun`` those examples are shared among the ranks, so the step is the same
    at any number of processes.

    Args:
        epochs: passes over the data (reshuffled each epoch from ``seed``).
        max_steps: optimiser updates; overrides ``epochs`` when set.
        lr: AdamW's peak learning rate (after warm-up).
        weight_decay: AdamW's decoupled weight decay, on matrices only.
        betas, eps: AdamW's moment decay rates and denominator epsilon.
        warmup_steps, warmup_ratio: linear warm-up from 0, in steps or as a fraction of the
            total (one of them).
        schedule: after warm-up, ``"linear"`` decay to 0, ``"cosine"`` decay to 0, or
            ``"constant"``.
        batch_size: examples per forward; ``grad_accum``: forwards per optimiser update.
        max_grad_norm: global gradient-norm clipping (None: no clipping).
        max_length: truncate tokenised examples to this many tokens (None: the model's n_ctx).
        seed: data order, LoRA initialisation and dropout (the caller's RNG is untouched).
        eval_every: steps between evaluations of ``eval_data`` (the last step always).
        eval_batch_size: examples per evaluation forward (default ``batch_size``).
        save_every: steps between checkpoints in ``out/checkpoint`` (the last step always).
        keep_intervention_at_eval: evaluate with the intervention on (default off: the
            evaluation sees the model as it will be used).
        padding_side: batches are right-padded (the only side the masked loss supports).
        device: where to train (default the model's; under torchrun each rank's device).
        in_place: train the given model itself instead of a copy.
        progress: show a tqdm bar.
        lora: train LoRA adapters (:class:`caft_tl.LoraConfig`) instead of every weight.
        keep_checkpoints: steps whose model is saved as ``out/step-N/``.
        gradient_checkpointing: recompute each block in the backward pass.
        fsdp: shard weights, gradients and optimiser state over torchrun's ranks.
    """

    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Schedule = "linear"
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    seed: int = 0
    eval_every: int | None = None
    eval_batch_size: int | None = None
    save_every: int | None = None
    keep_intervention_at_eval: bool = False
    padding_side: Literal["right"] = "right"
    device: str | None = None
    in_place: bool = False
    progress: bool = True
    lora: LoraConfig | None = None
    keep_checkpoints: list[int] | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # from JSON
        if isinstance(self.lora, Mapping):
            self.lora = LoraConfig.from_dict(self.lora)  # from JSON
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(f"lora must be a LoraConfig or None, got {self.lora!r}")
        self.keep_checkpoints = _check_steps("keep_checkpoints", self.keep_checkpoints)
        _check_int("epochs", self.epochs, 1)
        _check_int("max_steps", self.max_steps, 1, optional=True)
        _check_float("lr", self.lr, low=0.0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0)
        _check_float("eps", self.eps, low=0.0, low_open=True)
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(_is_number(b) and 0.0 <= b < 1.0 for b in self.betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_float("warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check_int("batch_size", self.batch_size, 1)
        _check_int("grad_accum", self.grad_accum, 1)
        if self.max_grad_norm is not None:
            _check_float("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        _check_int("max_length", self.max_length, 2, optional=True)
        _check_int("seed", self.seed, 0)
        _check_int("eval_every", self.eval_every, 1, optional=True)
        _check_int("eval_batch_size", self.eval_batch_size, 1, optional=True)
        _check_int("save_every", self.save_every, 1, optional=True)
        if self.padding_side != "right":
            raise ValueError(
                f"padding_side must be 'right' for training, got {self.padding_side!r}"
            )
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cuda' or None, got {self.device!r}")
        for name in (
            "keep_intervention_at_eval",
            "in_place",
            "progress",
            "gradient_checkpointing",
            "fsdp",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        # JSON-shaped (lists, not tuples): resuming compares it with the saved run's config.
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["lora"] = None if self.lora is None else self.lora.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls.from_dict(json.loads(text))


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


def _check_steps(name: str, steps: Any) -> list[int] | None:
    """A sorted list of distinct steps >= 1 (any iterable of ints accepted), or None."""
    if steps is None:
        return None
    if isinstance(steps, int | str) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps
    ):
        raise ValueError(f"{name} must be a list of step numbers >= 1 or None, got {steps!r}")
    return sorted(set(steps))


def _check_float(
    name: str, value: Any, low: float, high: float | None = None, low_open: bool = False
) -> None:
    ok = _is_number(value) and (value > low if low_open else value >= low)
    if ok and high is not None:
        ok = value < high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        bound += f" and < {high}" if high is not None else ""
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Data: chats, texts, prompt/answer pairs, or already tokenised rows
# --------------------------------------------------------------------------------------------


def _trainable_rows(ds: Dataset) -> tuple[list[list[int]], list[list[int]]]:
    """Rows with at least one target after position 0 (position 0 is never predicted)."""
    ids, masks = ds["input_ids"], ds["loss_mask"]
    keep = [i for i, m in enumerate(masks) if any(m[1:])]
    if not keep:
        raise DataError("no target tokens in the data (every loss_mask is empty)")
    if len(keep) < len(ids):
        warnings.warn(
            f"{len(ids) - len(keep)} of {len(ids)} example(s) have no target token; skipped",
            DataWarning,
            stacklevel=3,
        )
    return [list(ids[i]) for i in keep], [list(masks[i]) for i in keep]


def _fingerprint(ids: list[list[int]], masks: list[list[int]]) -> str:
    h = hashlib.sha256()
    for row, mask in zip(ids, masks, strict=True):
        h.update(np.asarray(row, dtype=np.int64).tobytes())
        h.update(np.asarray(mask, dtype=np.int8).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def masked_loss_sum(
    logits: Float[Tensor, "batch pos vocab"],
    input_ids: Int[Tensor, "batch pos"],
    loss_mask: Int[Tensor, "batch pos"],
) -> tuple[Float[Tensor, ""], int]:
    """Summed cross-entropy over target tokens, and their count (with the shift:
    position ``t - 1`` predicts token ``t`` wherever ``loss_mask[t] == 1``)."""
    targets = loss_mask[:, 1:].bool()
    picked = logits[:, :-1][targets].float()  # only target rows reach the softmax
    return F.cross_entropy(picked, input_ids[:, 1:][targets], reduction="sum"), int(targets.sum())


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
    return F.cross_entropy(logits[0].float(), labels, reduction="sum"), int(targets.sum())


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


def _micro_batches(
    ids: list[list[int]], masks: list[list[int]], index: list[int], size: int, pad: int, device
) -> list[dict[str, Tensor]]:
    out = []
    for start in range(0, len(index), size):
        rows = [{"input_ids": ids[i], "loss_mask": masks[i]} for i in index[start : start + size]]
        batch = collate(rows, pad_token_id=pad, padding_side="right")
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


@torch.no_grad()
def _eval_rows(
    model: HookedTransformer, ids: list[list[int]], masks: list[list[int]], batch_size: int
) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in _micro_batches(
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
    ids, masks = _trainable_rows(prepare_data(data, model.tokenizer, max_length=max_length))
    with applied(intervention, model):
        return _eval_rows(model, ids, masks, batch_size)


def applied(intervention: InterventionLike | None, model: HookedTransformer):
    """The intervention's hooks for a ``with`` block (removed however it exits), or nothing."""
    return nullcontext() if intervention is None else intervention.applied(model)


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------


def make_optimizer(model: HookedTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with no weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for update ``step`` (0-based): linear warm-up from 0, then
    constant, linear decay to 0, or cosine decay to 0 (the Hugging Face conventions)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------
# Output folder: run identity, metrics, checkpoints
# --------------------------------------------------------------------------------------------


def _run_identity(
    cfg: TrainConfig, fingerprint: str, eval_fp: str | None, intervention, base_fp: str | None
) -> dict:
    return {
        "format": RUN_FORMAT,
        "config": cfg.to_dict(),
        "data_fingerprint": fingerprint,
        "eval_data_fingerprint": eval_fp,
        "intervention": _describe(intervention),
        "base_model": base_fp,
    }


def _weights_fingerprint(model: HookedTransformer) -> str:
    """A hash of every parameter's name, dtype and bytes. A LoRA checkpoint holds only the
    adapters, so resuming one must start from the very same base weights."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1).cpu().contiguous()
        h.update(f"{name}:{flat.dtype}:{tuple(param.shape)}|".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _describe(intervention: InterventionLike | None) -> str | None:
    if intervention is None:
        return None
    if type(intervention).__repr__ is object.__repr__:  # the default repr holds an address
        return type(intervention).__qualname__
    return repr(intervention)


def _check_out(out: Path, identity: dict, resume: bool) -> None:
    """Refuse a folder holding another run; with ``resume``, the run must be the same."""
    run_file = out / RUN_FILE
    if not run_file.exists():
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} is not empty and holds no caft-tl training run; choose another folder"
            )
        return
    previous = read_json(run_file, f"cannot use {out}")
    if not resume:
        raise FileExistsError(
            f"{out} already holds a training run; pass resume=True to continue it, or "
            "choose another folder"
        )
    old_cfg, new_cfg = previous.get("config", {}), identity["config"]
    changed = sorted(
        k
        for k in set(old_cfg) | set(new_cfg)
        if k not in RESUMABLE_CHANGES and old_cfg.get(k) != new_cfg.get(k)
    )
    if changed:
        diffs = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {out}: the config differs from the saved run ({diffs})")
    for key, what in (
        ("data_fingerprint", "training data"),
        ("eval_data_fingerprint", "evaluation data"),
        ("intervention", "intervention"),
        ("base_model", "base model (LoRA runs resume on the same base weights)"),
    ):
        if previous.get(key) != identity[key]:
            raise ValueError(
                f"cannot resume {out}: the {what} differs from the saved run's "
                f"({previous.get(key)!r} -> {identity[key]!r})"
            )


def _keep_metrics_through(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (and a torn last line) so resumed steps log once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", math.inf) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def _plain(model: HookedTransformer) -> HookedTransformer:
    """The model as it should be saved: LoRA adapters merged (a view sharing the base)."""
    return merged_view(model) if has_lora(model) else model


def save_checkpoint(
    folder: Path, model, optimizer_state: dict, scheduler, state: dict, identity: dict
) -> None:
    """``model``: the plain (unsharded) training model, LoRA adapters attached."""
    with atomic_folder(folder, overwrite=True) as tmp:
        save_model(_plain(model), tmp, metadata={"train_step": state["step"]})
        if has_lora(model):
            write_tensors(lora_state_dict(model), tmp / LORA_FILE)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**identity, **state}, indent=2))


def load_checkpoint_weights(folder: Path, model) -> dict:
    """Weights (or LoRA adapters) of a checkpoint into the unsharded ``model``; its state."""
    what = f"cannot resume from {folder}"
    state = read_json(folder / STATE_FILE, what)
    if has_lora(model):  # the base is the caller's model (fingerprint-checked): adapters only
        load_lora_state_dict(model, read_tensors(folder / LORA_FILE, what))
    else:
        _load_weights(model, read_tensors(folder / "model.safetensors", what), what)
    return state


def load_checkpoint_training(folder: Path, optimizer, scheduler, sharded: bool) -> None:
    """The optimiser, schedule and RNG of a checkpoint (after the weights are in place)."""
    device = optimizer.param_groups[0]["params"][0].device
    saved = torch.load(folder / "optimizer.pt", map_location=device, weights_only=True)
    if sharded:
        from caft_tl.fsdp import ShardedModel

        ShardedModel.load_optimizer_state(optimizer, saved)
    else:
        optimizer.load_state_dict(saved)
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _load_weights(model: HookedTransformer, weights: Mapping[str, Tensor], what: str) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name not in weights:
                raise ValueError(f"{what}: weight {name!r} is missing")
            param.copy_(weights[name])


def _keep_snapshot(out: Path, model: HookedTransformer, step: int) -> None:
    """``out/step-N/``: a loadable model (``save_model`` writes it atomically)."""
    save_model(_plain(model), out / f"step-{step}", metadata={"train_step": step})


def _check_lora_request(model: HookedTransformer, cfg: TrainConfig, out: Any) -> None:
    if has_lora(model):
        raise ValueError(
            "the model already has LoRA adapters; pass the base model and set "
            "TrainConfig(lora=LoraConfig(...)) (or merge_lora(model) first)"
        )
    if cfg.keep_checkpoints and out is None:
        raise ValueError("keep_checkpoints needs out= (the folder for the step-N snapshots)")


def _warn_unreachable(cfg: TrainConfig, total: int) -> None:
    late = [s for s in cfg.keep_checkpoints or [] if s > total]
    if late:
        warnings.warn(
            f"keep_checkpoints {late} are beyond the run's last step ({total}); not saved",
            UserWarning,
            stacklevel=5,  # the caller of finetune (via _finetune and _plan)
        )


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def finetune(
    model: HookedTransformer,
    data: Any,
    cfg: TrainConfig | None = None,
    *,
    intervention: InterventionLike | None = None,
    eval_data: Any = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> HookedTransformer:
    """Fine-tune ``model`` on ``data``; returns the fine-tuned model (a copy unless
    ``cfg.in_place``), with ``intervention`` (an Ablation / Steering) active during training.

    Args:
        data: chat data, plain texts, prompt/answer pairs or a tokenised Dataset (see
            :func:`prepare_data`).
        eval_data: same kinds; its mean loss is logged every ``cfg.eval_every`` steps and at
            the end (without the intervention unless ``cfg.keep_intervention_at_eval``).
        out: folder for ``metrics.jsonl``, ``checkpoint/`` (every ``cfg.save_every`` steps and
            at the end) and ``final/``.
        resume: continue from ``out/checkpoint`` (same config and data); starts from step 0
            when there is no checkpoint yet. Gives the same weights as an unbroken run.
        callback: called with each step's metrics after they are logged and checkpointed.

    With ``cfg.lora`` only the adapters train, and the returned model has them merged (a
    plain HookedTransformer, as trainable as the given one).

    Under ``torchrun`` (see :mod:`caft_tl.distributed`) every rank calls this with the same
    arguments: the model trains through ``DistributedDataParallel`` (or sharded with FSDP,
    ``cfg.fsdp``), each rank takes every ``world_size``-th example of each step, and the
    update equals a single process's with the same config (the global batch is
    ``batch_size * grad_accum`` examples at any number of ranks). Rank 0 writes ``out``;
    every rank returns the trained model (with FSDP: gathered, on CPU; the sharded training
    copy is dropped, and an ``in_place`` model is consumed by the sharding).

    Randomness (LoRA dropout) comes from a torch RNG seeded with ``cfg.seed`` (plus the
    rank) and forked from the caller's, which stays as it was: the same config gives the
    same run, and a resumed run continues the saved RNG state.
    """
    cfg = cfg or TrainConfig()
    dist.setup()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + dist.rank())
        return _finetune(
            model,
            data,
            cfg,
            intervention=intervention,
            eval_data=eval_data,
            out=out,
            resume=resume,
            callback=callback,
        )


def _finetune(
    model: HookedTransformer,
    data: Any,
    cfg: TrainConfig,
    *,
    intervention: InterventionLike | None,
    eval_data: Any,
    out: str | os.PathLike | None,
    resume: bool,
    callback: Callable[[dict[str, Any]], None] | None,
) -> HookedTransformer:
    if resume and out is None:
        raise ValueError("resume=True needs out= (the folder holding the checkpoint)")
    model, base_fp = _training_model(model, cfg, out)
    plan = _plan(model, data, eval_data, cfg)
    folder = _RunFolder(out, cfg, plan.total)
    progress = folder.open(model, plan, intervention, base_fp, resume)
    trainer = _Trainer(model, cfg, plan, intervention, progress)
    try:
        while trainer.step < plan.total:
            record = trainer.train_step()
            folder.after_step(trainer, record)
            if callback is not None:
                callback(record)
    finally:
        trainer.close()
    model = trainer.trained_model()
    folder.finish(model)
    return model


# --------------------------------------------------------------------------------------------
# The pieces of a run: the model to train, the plan, the folder, one step
# --------------------------------------------------------------------------------------------


def _training_model(
    model: HookedTransformer, cfg: TrainConfig, out: Any
) -> tuple[HookedTransformer, str | None]:
    """The model the run trains (a copy unless ``in_place``, on its device, LoRA attached)
    and, for a LoRA run that saves, its base weights' fingerprint."""
    _check_lora_request(model, cfg, out)
    hooked = [
        name for name, hp in model.hook_dict.items() if hp._forward_hooks or hp._backward_hooks
    ]
    if hooked:
        raise ValueError(
            f"the model has hooks attached at {hooked[:5]}; remove them (model.reset_hooks()) "
            "and pass intervention= instead, so they are on for training steps only"
        )
    if not cfg.in_place:
        model = copy.deepcopy(model)
    sharded = cfg.fsdp and dist.is_distributed()
    target_device = dist.device() if dist.is_distributed() else cfg.device
    if (
        not sharded  # FSDP moves each rank's shards to its device itself
        and target_device is not None
        and torch.device(target_device) != next(model.parameters()).device
    ):
        model.to(target_device, print_details=False)
    base_fp = _weights_fingerprint(model) if cfg.lora is not None and out is not None else None
    if cfg.lora is not None:
        # Seeded from the run's seed, so a LoRA run is as repeatable as a full one.
        apply_lora(model, cfg.lora, generator=torch.Generator().manual_seed(cfg.seed))
    return model, base_fp


@dataclass
class _Plan:
    """What the run trains on and for how long, fixed before the first step."""

    ids: list[list[int]]
    masks: list[list[int]]
    eval_rows: tuple[list[list[int]], list[list[int]]] | None
    per_step: int  # examples per optimiser update (batch_size * grad_accum)
    steps_per_epoch: int
    total: int
    warmup: int
    eval_batch: int
    pad: int

    def examples(self, step: int, seed: int) -> tuple[int, int, list[int]]:
        """``(epoch, position in the epoch, example indices)`` of the update after ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = _epoch_order(len(self.ids), seed, epoch)
        return epoch, position, order[position * self.per_step : (position + 1) * self.per_step]


def _plan(model: HookedTransformer, data: Any, eval_data: Any, cfg: TrainConfig) -> _Plan:
    ids, masks = _trainable_rows(prepare_data(data, model.tokenizer, max_length=cfg.max_length))
    eval_rows = None
    if eval_data is not None:
        eval_rows = _trainable_rows(
            prepare_data(eval_data, model.tokenizer, max_length=cfg.max_length)
        )
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(ids) / per_step)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    _warn_unreachable(cfg, total)
    return _Plan(
        ids, masks, eval_rows, per_step, steps_per_epoch, total,
        warmup=cfg.warmup_steps or int(cfg.warmup_ratio * total),
        eval_batch=cfg.eval_batch_size or cfg.batch_size, pad=pad_id(model.tokenizer),
    )  # fmt: skip


@dataclass
class _Progress:
    """Where a run stands: steps and target tokens done, seconds spent in earlier sessions,
    and the checkpoint to restore the optimiser from (when resuming)."""

    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0
    resume_from: Path | None = None


class _RunFolder:
    """``out/``: the run's identity, metrics, checkpoints, snapshots and final model. Every
    rank knows *whether* the run saves (``requested``); only rank 0 writes (``path``)."""

    def __init__(self, out: str | os.PathLike | None, cfg: TrainConfig, total: int):
        self.requested = out is not None
        self.path = Path(out) if out is not None else None
        self.cfg, self.total = cfg, total
        self.identity: dict[str, Any] | None = None

    def open(self, model, plan: _Plan, intervention, base_fp, resume: bool) -> _Progress:
        """Check the folder (a resumed run must be the same run), load a checkpoint's
        weights, record the run and drop metric lines past the checkpoint."""
        progress = _Progress()
        if self.path is None:
            return progress
        eval_fp = None if plan.eval_rows is None else _fingerprint(*plan.eval_rows)
        fingerprint = _fingerprint(plan.ids, plan.masks)
        self.identity = _run_identity(self.cfg, fingerprint, eval_fp, intervention, base_fp)
        # Rank 0 looks (the others must not: it writes the run file right after).
        dist.check_on_main(lambda: _check_out(self.path, self.identity, resume))
        if resume and (self.path / "checkpoint" / STATE_FILE).exists():
            # Weights go in before sharding; the optimiser state once the optimiser exists.
            progress.resume_from = self.path / "checkpoint"
            state = load_checkpoint_weights(progress.resume_from, model)
            progress.step, progress.tokens = state["step"], state["tokens"]
            progress.elapsed_before = state["elapsed"]
        if dist.is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / RUN_FILE).write_text(json.dumps(self.identity, indent=2))
            _keep_metrics_through(self.path / METRICS_FILE, progress.step)
        else:
            self.path = None  # the other ranks write nothing
        return progress

    def after_step(self, trainer: _Trainer, record: dict[str, Any]) -> None:
        """Log the step; checkpoint / snapshot it when the config says so."""
        step, cfg = record["step"], self.cfg
        checkpoints = _checkpoints_at(cfg, step, self.total)
        saves = self.requested and _saves_at(cfg, step, self.total)
        plain, optimizer_state = trainer.saved_state(saves, checkpoints)
        if self.path is not None:
            with open(self.path / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            if checkpoints:
                state = {
                    "step": step, "epoch": trainer.epoch, "position": trainer.position + 1,
                    "tokens": record["tokens"], "elapsed": record["elapsed"],
                }  # fmt: skip
                save_checkpoint(
                    self.path / "checkpoint", plain, optimizer_state, trainer.scheduler, state,
                    self.identity,
                )  # fmt: skip
            if step in (cfg.keep_checkpoints or ()):
                _keep_snapshot(self.path, plain, step)
        trainer.release(plain)
        if saves:
            # A rank that stops after this step (killed, or a callback raising) must not
            # take the group down before rank 0's checkpoint is on disk.
            dist.barrier()

    def finish(self, model: HookedTransformer) -> None:
        if self.path is not None:
            meta = {"train_config": self.cfg.to_dict()}
            save_model(model, self.path / "final", metadata=meta)
        dist.barrier()  # every rank returns once the final model is written


class _Trainer:
    """The model, optimiser and schedule of a run, and one update at a time."""

    def __init__(self, model, cfg: TrainConfig, plan: _Plan, intervention, progress: _Progress):
        self.model, self.cfg, self.plan, self.intervention = model, cfg, plan, intervention
        self.step, self.tokens = progress.step, progress.tokens
        self.elapsed_before = progress.elapsed_before
        self.epoch = self.position = 0
        self.sharded = None
        if cfg.fsdp and dist.is_distributed():
            from caft_tl.fsdp import ShardedModel

            self.sharded = ShardedModel(model, dist.device())
        self.device = next(model.parameters()).device
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, plan.total, plan.warmup, cfg.schedule)
        )
        if progress.resume_from is not None:
            load_checkpoint_training(
                progress.resume_from, self.optimizer, self.scheduler, self.sharded is not None
            )
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=plan.total, initial=self.step, desc="finetune",
            disable=not (cfg.progress and dist.is_main()),
        )  # fmt: skip
        self.was_training = model.training
        model.train()
        self.ddp = None if self.sharded is not None else _data_parallel(model)

    def train_step(self) -> dict[str, Any]:
        """One optimiser update (hooks on only for its forward/backward passes); its record."""
        self.epoch, self.position, index = self.plan.examples(self.step, self.cfg.seed)
        # Every rank knows the whole step, so the loss is normalised by all its targets.
        n_targets = sum(sum(self.plan.masks[i][1:]) for i in index)
        lr = self.scheduler.get_last_lr()[0]
        step_loss = self._accumulate(index, n_targets)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in self.optimizer.param_groups for p in g["params"]],
            self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf,
        )
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += n_targets
        record: dict[str, Any] = {
            "step": self.step,
            "epoch": round(self.step / self.plan.steps_per_epoch, 6),
            "loss": step_loss / n_targets,
            "lr": lr,
            "grad_norm": float(full(grad_norm)),
            "tokens": self.tokens,
            "elapsed": round(self.elapsed_before + time.perf_counter() - self.started, 3),
        }
        every = self.cfg.eval_every
        if self.plan.eval_rows is not None and (
            self.step == self.plan.total or (every is not None and self.step % every == 0)
        ):
            record["eval_loss"] = self.evaluate()
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        return record

    def _accumulate(self, index: list[int], n_targets: int) -> float:
        """Gradients of one step's micro-batches; the summed loss over every rank."""
        mine, weight = _rank_share(index)
        plan, model, sharded = self.plan, self.model, self.sharded is not None
        micro = _micro_batches(
            plan.ids, plan.masks, mine, self.cfg.batch_size, plan.pad, self.device
        )
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        with (
            torch.enable_grad(),
            applied(self.intervention, model),
            checkpointed_blocks(model) if self.cfg.gradient_checkpointing else nullcontext(),
        ):
            for j, batch in enumerate(micro):
                # Gradients are exchanged once per step, after the last micro-batch.
                last = j == len(micro) - 1
                sync = _gradient_sync(self.ddp, model if sharded else None, last)
                with sync, autocast_for(self.device):
                    loss, _ = target_loss_sum(model, batch, forward=self.ddp)
                # DDP and FSDP average over ranks; ``weight`` (world size, or 0 for a rank
                # with nothing to do this step) makes that the sum one process computes.
                (loss / n_targets * weight).backward()
                step_loss += loss.item() if weight else 0.0
        return dist.sum_over_ranks(step_loss)

    def evaluate(self) -> float:
        keep = self.intervention if self.cfg.keep_intervention_at_eval else None
        with applied(keep, self.model):
            return _eval_rows(self.model, *self.plan.eval_rows, self.plan.eval_batch)

    def saved_state(self, saves: bool, keeps_state: bool) -> tuple[Any, dict | None]:
        """What a checkpoint holds: the plain model and the optimiser state (gathered from
        the shards, on every rank, when sharded; only rank 0 writes)."""
        plain, optimizer_state = self.model, None
        if saves:
            if self.sharded is not None:
                plain = self.sharded.gather(everyone=False)
                if keeps_state:
                    optimizer_state = self.sharded.optimizer_state(self.optimizer)
            elif keeps_state and dist.is_main():
                optimizer_state = self.optimizer.state_dict()
        return plain, optimizer_state

    def release(self, plain: Any) -> None:
        """Drop a gathered copy of the sharded model."""
        if self.sharded is not None and plain is not None and plain is not self.model:
            self.sharded.release()

    def close(self) -> None:
        """Also on errors: an in-place model is never left in train mode, with gradients,
        or half-adapted (a sharded one is consumed anyway)."""
        self.bar.close()
        self.model.train(self.was_training)
        self.model.zero_grad(set_to_none=True)
        if has_lora(self.model) and self.sharded is None:
            merge_lora(self.model)

    def trained_model(self) -> HookedTransformer:
        if self.sharded is None:
            return self.model
        model = self.sharded.gather(everyone=True).train(self.was_training)  # plain, on CPU
        if has_lora(model):
            merge_lora(model)
        return model


def _checkpoints_at(cfg: TrainConfig, step: int, total: int) -> bool:
    return step == total or (cfg.save_every is not None and step % cfg.save_every == 0)


def _saves_at(cfg: TrainConfig, step: int, total: int) -> bool:
    """Whether rank 0 writes anything after ``step`` (a checkpoint or a kept snapshot)."""
    return _checkpoints_at(cfg, step, total) or step in (cfg.keep_checkpoints or ())


def _gradient_sync(ddp: Any, sharded: Any, last: bool) -> Any:
    """A context for one micro-batch's backward: gradients are exchanged only on the last
    of a step (``ddp``: the DDP wrapper; ``sharded``: the FSDP-sharded model)."""
    if sharded is not None:
        sharded.set_requires_gradient_sync(last)
    if ddp is None or last:
        return nullcontext()
    return ddp.no_sync()


def _data_parallel(model: HookedTransformer) -> Any:
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


def _rank_share(index: list[int]) -> tuple[list[int], float]:
    """This rank's examples of a step and the weight of its loss. A rank left without an
    example (a short last step) runs one with weight 0, so every rank joins the exchange."""
    if not dist.is_distributed():
        return index, 1.0
    mine = index[dist.rank() :: dist.world_size()]
    return (mine, float(dist.world_size())) if mine else (index[:1], 0.0)


def tidy_run(folder: Path, *, keep_final: bool, keep_all: bool) -> None:
    """Free the disk once a fine-tuning run is evaluated: its resumable state (weights plus
    AdamW moments, about 1.9 GB for SmolLM2) always; its kept snapshots (``step-*``) and
    final model (0.6 GB each) unless ``keep_all``, the final one also kept with
    ``keep_final``. run.json and metrics.jsonl stay as the run's record."""
    doomed = [folder / "checkpoint"]
    if not keep_all:
        doomed += list(folder.glob("step-*")) + ([] if keep_final else [folder / "final"])
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
