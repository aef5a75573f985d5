"""``caft-tl plan`` (memory per GPU of a fine-tune, from a model's config alone) and
``caft-tl convert`` (a model folder into a caft-tl checkpoint, loaded tensor by tensor)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def plan_config(name: str) -> Any:
    """A model's TransformerLens config without loading its weights: ``embedded``, a caft-tl
    checkpoint, a Hugging Face folder (only ``config.json`` is read) or a JSON file of
    config fields (``d_model``, ``n_layers``, ...)."""
    from caft_tl.models import (
        CHECKPOINT_MARKER,
        EMBEDDED_ALIASES,
        embedded_cache_path,
        load_model,
        tl_config_from_hf,
    )

    if name.lower() in EMBEDDED_ALIASES:
        folder = embedded_cache_path()
        if not (folder / CHECKPOINT_MARKER).exists():
            load_model(device="cpu")  # converts the embedded model into the cache once
        return json.loads((folder / "config.json").read_text())
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    if (path / CHECKPOINT_MARKER).exists():
        return json.loads((path / "config.json").read_text())
    if (path / "config.json").exists():
        from transformers import AutoConfig

        return tl_config_from_hf(AutoConfig.from_pretrained(str(path)), device="cpu")
    raise FileNotFoundError(
        f"{name}: not 'embedded', a caft-tl checkpoint, a Hugging Face folder with "
        "config.json, or a .json file of config fields"
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from caft_tl.lora import LORA_TARGETS, LoraConfig
    from caft_tl.memory import GIB, estimate_finetune_memory

    cfg = plan_config(args.model)
    lora = None
    if args.lora_r is not None:
        lora = LoraConfig(r=args.lora_r, targets=tuple(args.lora_targets or LORA_TARGETS))
    est = estimate_finetune_memory(
        cfg,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype or "float32",
        lora=lora,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_form=args.lora_form,
        fsdp=args.fsdp,
        world_size=args.world_size,
    )
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    setup = [
        f"{est.n_params / 1e9:.2f}B parameters ({est.n_trainable / 1e6:.1f}M trained)",
        f"{args.dtype or 'float32'}",
        f"{args.batch_size} x {args.seq_len} tokens per forward",
        f"LoRA r={args.lora_r}" if lora else "full fine-tuning",
        "gradient checkpointing" if args.gradient_checkpointing else "no checkpointing",
        f"FSDP over {args.world_size} ranks" if args.fsdp else f"{args.world_size} DDP rank(s)",
    ]
    print(", ".join(setup))
    print(est.table())
    if args.gpu_gib is not None:
        need = est.total / GIB + 3.0  # the table's CUDA context and allocator slack, at most
        verdict = "fits" if need <= args.gpu_gib else "does NOT fit"
        print(f"\n{verdict} a {args.gpu_gib:g} GiB GPU (needs about {need:.1f} GiB with slack)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from caft_tl.models import load_model, save_model

    model = load_model(
        None if args.model == "embedded" else args.model, device="cpu", dtype=args.dtype
    )
    save_model(model, args.out, metadata={"converted_from": str(args.model)})
    print(f"saved {model.cfg.model_name} ({args.dtype or 'float32'}) in {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    plan = sub.add_parser(
        "plan", help="memory per GPU of a fine-tune, from the model's config (no weights)"
    )
    plan.add_argument("model", help="embedded, a checkpoint / HF folder, or a .json of fields")
    plan.add_argument("--batch-size", type=int, required=True, help="examples per forward")
    plan.add_argument("--seq-len", type=int, required=True, help="tokens per example")
    plan.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: full)")
    plan.add_argument("--lora-targets", nargs="+", default=None, help="weights (W_Q ... W_out)")
    plan.add_argument("--lora-form", choices=["factored", "merged"], default="factored")
    plan.add_argument("--gradient-checkpointing", action="store_true")
    plan.add_argument("--fsdp", action="store_true", help="shard over --world-size ranks")
    plan.add_argument("--world-size", type=int, default=1)
    plan.add_argument("--gpu-gib", type=float, default=None, help="say whether it fits")
    plan.add_argument("--json", action="store_true", help="print JSON (bytes)")
    plan.set_defaults(func=cmd_plan)

    convert = sub.add_parser(
        "convert", help="save a model (HF folder, embedded, ...) as a caft-tl checkpoint"
    )
    convert.add_argument("model", help="embedded, a Hugging Face folder, or a checkpoint")
    convert.add_argument("out", help="new checkpoint folder (use the global --dtype)")
    convert.set_defaults(func=cmd_convert)
