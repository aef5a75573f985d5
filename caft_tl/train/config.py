"""The configuration of a fine-tuning run: :class:`TrainConfig` and its checks."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from caft_tl._io import dataclass_from_dict
from caft_tl.lora import LoraConfig

Schedule = Literal["linear", "cosine", "constant"]
SCHEDULES = ("linear", "cosine", "constant")
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
