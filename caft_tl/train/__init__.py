"""Fine-tuning a HookedTransformer, optionally with an intervention (CAFT) active.

One room per concern, read in this order: :mod:`~caft_tl.train.config` (the config),
:mod:`~caft_tl.train.plan` (data rows, epoch order, micro-batches), :mod:`~caft_tl.train.loss`,
:mod:`~caft_tl.train.optim` (optimiser and schedule), :mod:`~caft_tl.train.run_folder`
(identity, metrics, checkpoints), :mod:`~caft_tl.train.parallel` (torchrun) and
:mod:`~caft_tl.train.loop`, whose :func:`finetune` loop is one screen long.

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
  ``load_model``, plus optimiser, scheduler and RNG states; the last step's checkpoint
  leaves the optimiser state out, as a finished run has nothing left to train),
  ``step-N/`` snapshots for the steps in ``cfg.keep_checkpoints`` and ``final/`` (the
  model).
- With ``cfg.lora`` only low-rank adapters train (:mod:`caft_tl.lora`); every saved model
  (checkpoint, snapshots, final) is the merged plain model, and the returned model is merged
  too. The checkpoint also holds the adapters (``lora.safetensors``) for resuming, which
  needs the same base model (checked by a fingerprint of its weights).
"""

from caft_tl.data.chat import prepare_data, tokenize_prompt_answer
from caft_tl.train.config import RESUMABLE_CHANGES, SCHEDULES, TrainConfig
from caft_tl.train.loop import finetune
from caft_tl.train.loss import (
    applied,
    autocast_for,
    checkpointed_blocks,
    cross_entropy_sum,
    evaluate_loss,
    masked_loss_sum,
    target_loss_sum,
)
from caft_tl.train.optim import lr_factor, make_optimizer
from caft_tl.train.run_folder import (
    LORA_FILE,
    METRICS_FILE,
    RUN_FILE,
    RUN_FORMAT,
    STATE_FILE,
    load_checkpoint_training,
    load_checkpoint_weights,
    save_checkpoint,
    tidy_run,
)

__all__ = [
    "LORA_FILE",
    "METRICS_FILE",
    "RESUMABLE_CHANGES",
    "RUN_FILE",
    "RUN_FORMAT",
    "SCHEDULES",
    "STATE_FILE",
    "TrainConfig",
    "applied",
    "autocast_for",
    "checkpointed_blocks",
    "cross_entropy_sum",
    "evaluate_loss",
    "finetune",
    "load_checkpoint_training",
    "load_checkpoint_weights",
    "lr_factor",
    "make_optimizer",
    "masked_loss_sum",
    "prepare_data",
    "save_checkpoint",
    "target_loss_sum",
    "tidy_run",
    "tokenize_prompt_answer",
]
