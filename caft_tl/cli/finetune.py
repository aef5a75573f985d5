"""``caft-tl finetune``: a plain or CAFT fine-tune from the command line (see
:func:`caft_tl.finetune`), resumable with ``--resume``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caft_tl.cli import common


def _lora_config(args: argparse.Namespace):
    from caft_tl.lora import LoraConfig

    given = {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "targets": None if args.lora_targets is None else tuple(args.lora_targets),
    }
    given = {k: v for k, v in given.items() if v is not None}
    return LoraConfig(**given) if given else None


def _train_config(args: argparse.Namespace):
    from caft_tl.train import TrainConfig

    given = {
        name: getattr(args, name)
        for name in ("epochs", "lr", "batch_size", "grad_accum", "warmup_steps", "schedule", "seed")
        if getattr(args, name) is not None
    }
    return TrainConfig(
        **given,
        max_steps=args.max_steps,
        max_length=args.max_length,
        save_every=args.save_every,
        lora=_lora_config(args),
        keep_checkpoints=args.keep_checkpoints,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
        progress=not args.quiet,
    )


def _finished_step(out: Path) -> int | None:
    """The step of a finished run in ``out`` (its final model exists), else None."""
    state = out / "checkpoint" / "trainer_state.json"
    if not (out / "final").is_dir() or not state.is_file():
        return None
    return json.loads(state.read_text()).get("step")


def cmd_finetune(args: argparse.Namespace) -> int:
    from caft_tl import distributed
    from caft_tl.train import finetune

    distributed.setup()  # under torchrun: join the process group (no-op otherwise)
    out = Path(args.out)
    if (out / "run.json").exists() and not args.resume:
        raise FileExistsError(
            f"{out} already holds a training run; pass --resume to continue it, or choose "
            "another --out"
        )
    common.check_intervention_args(args)
    cfg = _train_config(args)
    args.batch_size = cfg.batch_size  # the mean of --mode mean/steer is fitted in such batches
    data = common.read_train_data(args.data, "DATA")
    eval_data = (
        None if args.eval_data is None else common.read_train_data(args.eval_data, "--eval-data")
    )
    device = args.device
    if args.fsdp and distributed.is_distributed() and device is None:
        device = "cpu"  # FSDP moves each rank's shards to its GPU; the whole may not fit one
    with distributed.main_first():  # one rank converts the embedded model into the cache
        model = common.load(args.model, device, args.dtype)
    intervention = common.intervention(args, model, data)
    done = _finished_step(out) if args.resume else None
    steps: list[dict] = []
    finetune(
        model,
        data,
        cfg,
        intervention=intervention,
        eval_data=eval_data,
        out=out,
        resume=args.resume,
        callback=steps.append,
    )
    if not distributed.is_main():
        return 0
    if done is not None and not steps:
        print(f"{out} already finished at step {done}; nothing left to train")
    elif steps:
        last = steps[-1]
        extra = f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        print(f"trained to step {last['step']}: loss {last['loss']:.4f}{extra}")
    print(f"model saved in {out / 'final'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune, optionally with a concept intervention")
    p.add_argument("model", help="embedded, a checkpoint / HF folder, or a TransformerLens name")
    p.add_argument("data", help="chat JSONL, prompt/answer JSONL, or .txt")
    p.add_argument("--out", required=True, help="folder for metrics, checkpoints, final model")
    common.add_intervention_args(p)
    # Unset options take TrainConfig's defaults (one copy of them, shown in its docs).
    p.add_argument("--epochs", type=int, help="passes over DATA (TrainConfig: 1)")
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--lr", type=float, help="peak learning rate (TrainConfig: 1e-5)")
    p.add_argument("--batch-size", type=int, help="examples per forward (TrainConfig: 8)")
    p.add_argument("--grad-accum", type=int, help="forwards per update (TrainConfig: 1)")
    p.add_argument("--warmup-steps", type=int, help="(TrainConfig: 0)")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], help="(linear)")
    p.add_argument("--seed", type=int, help="(TrainConfig: 0)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--eval-data", default=None, help="held-out data, same formats as DATA")
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of rank R")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (16)")
    p.add_argument("--lora-targets", nargs="+", default=None, help="weights (W_Q ... W_out)")
    p.add_argument(
        "--keep-checkpoints", type=int, nargs="+", default=None, help="save out/step-N at steps"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each block in the backward pass (less activation memory)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard weights, gradients and optimiser state over the ranks",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)
