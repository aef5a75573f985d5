"""A run's folder ``out/``: ``run.json`` (config + data fingerprints; a resumed run must be
the same run), ``metrics.jsonl``, the atomic ``checkpoint/`` (weights, optimiser, scheduler,
RNG), ``step-N/`` snapshots and ``final/``; and :func:`tidy_run`, which frees an evaluated
run's disk."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from caft_tl import distributed as dist
from caft_tl._io import atomic_folder, read_json, read_tensors, write_tensors
from caft_tl.lora import has_lora, load_lora_state_dict, lora_state_dict, merged_view
from caft_tl.models import save_model
from caft_tl.train.config import RESUMABLE_CHANGES, TrainConfig
from caft_tl.train.plan import Plan, rows_fingerprint

if TYPE_CHECKING:  # typing only: no run-time import of the directions package
    from caft_tl.interventions import InterventionLike

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
LORA_FILE = "lora.safetensors"
RUN_FORMAT = "caft_tl.train_run"


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


def weights_fingerprint(model: HookedTransformer) -> str:
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
    folder: Path, model, optimizer_state: dict | None, scheduler, state: dict, identity: dict
) -> None:
    """``model``: the plain (unsharded) training model, LoRA adapters attached.
    ``optimizer_state`` None: the checkpoint of a finished run, without the AdamW moments
    (twice the model's size, and nothing is left to train with them)."""
    with atomic_folder(folder, overwrite=True) as tmp:
        save_model(_plain(model), tmp, metadata={"train_step": state["step"]})
        if has_lora(model):
            write_tensors(lora_state_dict(model), tmp / LORA_FILE)
        if optimizer_state is not None:
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


@dataclass
class Progress:
    """Where a run stands: steps and target tokens done, seconds spent in earlier sessions,
    and the checkpoint to restore the optimiser from (when resuming)."""

    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0
    resume_from: Path | None = None


class SteppingTrainer(Protocol):
    """What the run folder reads from the loop's trainer after a step (the seam between
    :mod:`caft_tl.train.loop` and this module, which must not import the loop)."""

    epoch: int
    position: int
    scheduler: Any

    def saved_state(self, saves: bool, keeps_state: bool) -> tuple[Any, dict | None]: ...

    def release(self, plain: Any) -> None: ...


class RunFolder:
    """``out/``: the run's identity, metrics, checkpoints, snapshots and final model. Every
    rank knows *whether* the run saves (``requested``); only rank 0 writes (``path``)."""

    def __init__(self, out: str | os.PathLike | None, cfg: TrainConfig, total: int):
        self.requested = out is not None
        self.path = Path(out) if out is not None else None
        self.cfg, self.total = cfg, total
        self.identity: dict[str, Any] | None = None

    def open(self, model, plan: Plan, intervention, base_fp, resume: bool) -> Progress:
        """Check the folder (a resumed run must be the same run), load a checkpoint's
        weights, record the run and drop metric lines past the checkpoint."""
        progress = Progress()
        if self.path is None:
            return progress
        eval_fp = None if plan.eval_rows is None else rows_fingerprint(*plan.eval_rows)
        fingerprint = rows_fingerprint(plan.ids, plan.masks)
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

    def after_step(self, trainer: SteppingTrainer, record: dict[str, Any]) -> None:
        """Log the step; checkpoint / snapshot it when the config says so."""
        step, cfg = record["step"], self.cfg
        checkpoints = _checkpoints_at(cfg, step, self.total)
        saves = self.requested and _saves_at(cfg, step, self.total)
        # The last step's checkpoint only marks the run finished: a resumed finished run
        # trains no further, so the optimiser state (about 1 GB for SmolLM2) stays out.
        plain, optimizer_state = trainer.saved_state(saves, checkpoints and step < self.total)
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


def _checkpoints_at(cfg: TrainConfig, step: int, total: int) -> bool:
    return step == total or (cfg.save_every is not None and step % cfg.save_every == 0)


def _saves_at(cfg: TrainConfig, step: int, total: int) -> bool:
    """Whether rank 0 writes anything after ``step`` (a checkpoint or a kept snapshot)."""
    return _checkpoints_at(cfg, step, total) or step in (cfg.keep_checkpoints or ())


def tidy_run(folder: Path, *, keep_final: bool, keep_all: bool) -> None:
    """Free the disk once a fine-tuning run is evaluated: its checkpoint (0.6 GB for
    SmolLM2 when finished, plus 1.1 GB of AdamW moments when not) always; its kept
    snapshots (``step-*``) and
    final model (0.6 GB each) unless ``keep_all``, the final one also kept with
    ``keep_final``. run.json and metrics.jsonl stay as the run's record."""
    doomed = [folder / "checkpoint"]
    if not keep_all:
        doomed += list(folder.glob("step-*")) + ([] if keep_final else [folder / "final"])
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
