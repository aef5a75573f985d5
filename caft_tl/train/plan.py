"""What a run trains on and in which order: the trainable rows of the data, their
fingerprint, each epoch's shuffled order, right-padded micro-batches and the :class:`Plan`
fixed before the first step."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import Tensor
from transformer_lens import HookedTransformer

from caft_tl.data.chat import DataError, DataWarning, collate, pad_id, prepare_data
from caft_tl.train.config import TrainConfig


def trainable_rows(ds: Dataset) -> tuple[list[list[int]], list[list[int]]]:
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


def rows_fingerprint(ids: list[list[int]], masks: list[list[int]]) -> str:
    """A short hash of the rows and their masks: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for row, mask in zip(ids, masks, strict=True):
        h.update(np.asarray(row, dtype=np.int64).tobytes())
        h.update(np.asarray(mask, dtype=np.int8).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(
    ids: list[list[int]], masks: list[list[int]], index: list[int], size: int, pad: int, device
) -> list[dict[str, Tensor]]:
    """The rows at ``index`` as right-padded batches of at most ``size``, on ``device``."""
    out = []
    for start in range(0, len(index), size):
        rows = [{"input_ids": ids[i], "loss_mask": masks[i]} for i in index[start : start + size]]
        batch = collate(rows, pad_token_id=pad, padding_side="right")
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def _warn_unreachable(cfg: TrainConfig, total: int) -> None:
    late = [s for s in cfg.keep_checkpoints or [] if s > total]
    if late:
        warnings.warn(
            f"keep_checkpoints {late} are beyond the run's last step ({total}); not saved",
            UserWarning,
            stacklevel=5,  # the caller of finetune (via _finetune and make_plan)
        )


@dataclass
class Plan:
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
        order = epoch_order(len(self.ids), seed, epoch)
        return epoch, position, order[position * self.per_step : (position + 1) * self.per_step]


def make_plan(model: HookedTransformer, data: Any, eval_data: Any, cfg: TrainConfig) -> Plan:
    """Tokenise the data (and the evaluation data), and fix the run's length and warm-up."""
    ids, masks = trainable_rows(prepare_data(data, model.tokenizer, max_length=cfg.max_length))
    eval_rows = None
    if eval_data is not None:
        eval_rows = trainable_rows(
            prepare_data(eval_data, model.tokenizer, max_length=cfg.max_length)
        )
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(ids) / per_step)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    _warn_unreachable(cfg, total)
    return Plan(
        ids, masks, eval_rows, per_step, steps_per_epoch, total,
        warmup=cfg.warmup_steps or int(cfg.warmup_ratio * total),
        eval_batch=cfg.eval_batch_size or cfg.batch_size, pad=pad_id(model.tokenizer),
    )  # fmt: skip
