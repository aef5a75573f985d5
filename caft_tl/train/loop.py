"""The training loop: :func:`finetune`, one screen long, over a :class:`~caft_tl.train.plan.Plan`,
a :class:`~caft_tl.train.run_folder.RunFolder` (open / after_step / finish) and a
:class:`Trainer` (one optimiser update at a time)."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from caft_tl import distributed as dist
from caft_tl.fsdp import full
from caft_tl.lora import apply_lora, has_lora, merge_lora
from caft_tl.train.config import TrainConfig
from caft_tl.train.loss import (
    applied,
    autocast_for,
    checkpointed_blocks,
    mean_target_loss,
    target_loss_sum,
)
from caft_tl.train.optim import lr_factor, make_optimizer
from caft_tl.train.parallel import data_parallel, gradient_sync, rank_share
from caft_tl.train.plan import Plan, make_plan, micro_batches
from caft_tl.train.run_folder import (
    Progress,
    RunFolder,
    load_checkpoint_training,
    weights_fingerprint,
)

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike


def _check_lora_request(model: HookedTransformer, cfg: TrainConfig, out: Any) -> None:
    if has_lora(model):
        raise ValueError(
            "the model already has LoRA adapters; pass the base model and set "
            "TrainConfig(lora=LoraConfig(...)) (or merge_lora(model) first)"
        )
    if cfg.keep_checkpoints and out is None:
        raise ValueError("keep_checkpoints needs out= (the folder for the step-N snapshots)")


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
    plan = make_plan(model, data, eval_data, cfg)
    folder = RunFolder(out, cfg, plan.total)
    progress = folder.open(model, plan, intervention, base_fp, resume)
    trainer = Trainer(model, cfg, plan, intervention, progress)
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
    base_fp = weights_fingerprint(model) if cfg.lora is not None and out is not None else None
    if cfg.lora is not None:
        # Seeded from the run's seed, so a LoRA run is as repeatable as a full one.
        apply_lora(model, cfg.lora, generator=torch.Generator().manual_seed(cfg.seed))
    return model, base_fp


class Trainer:
    """The model, optimiser and schedule of a run, and one update at a time."""

    def __init__(self, model, cfg: TrainConfig, plan: Plan, intervention, progress: Progress):
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
        if progress.resume_from is not None and progress.step < plan.total:
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
        self.ddp = None if self.sharded is not None else data_parallel(model)

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
        mine, weight = rank_share(index)
        plan, model, sharded = self.plan, self.model, self.sharded is not None
        micro = micro_batches(
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
                sync = gradient_sync(self.ddp, model if sharded else None, last)
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
            return mean_target_loss(self.model, *self.plan.eval_rows, self.plan.eval_batch)

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
