"""A short CAFT fine-tune of a tiny model, run by tests/test_distributed.py both under
``torchrun --nproc_per_node=2`` (gloo) and as a single process.

    python tests/ddp_finetune.py OUT [--resume] [--stop-after STEP]
        [--lora] [--checkpointing] [--fsdp]

Writes the run to OUT (metrics, checkpoint, final model: rank 0 only).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

import caft_tl as ct
from caft_tl import distributed
from caft_tl.directions import ConceptSet, random_directions
from caft_tl.interventions import Ablation
from caft_tl.models import tiny

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]


def chats() -> list[list[dict[str, str]]]:
    words = ["red", "green", "blue", "cold", "warm", "north", "south", "quiet", "loud"]
    out = []
    # 13 examples, global batch 4: the last step of an epoch has 1, so the second rank has
    # none and joins the gradient exchange with a zero-weight example.
    for i in range(13):
        a, b = words[i % len(words)], words[(3 * i + 1) % len(words)]
        out.append(
            [
                {"role": "user", "content": f"Say {a} then {b}."},
                {"role": "assistant", "content": f"{a} {b} " * (1 + i % 3)},
            ]
        )
    return out


class Stop(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (r=4)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP")
    args = parser.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.set_num_threads(1)
    model = tiny(seed=0, n_layers=2, d_model=32, n_heads=4, d_mlp=64)
    like = ConceptSet({h: torch.zeros(2, model.cfg.d_model) for h in HOOKS})
    ablation = Ablation(random_directions(like, seed=1), mode="zero")
    cfg = ct.TrainConfig(
        lr=3e-3,
        batch_size=2,
        grad_accum=2,
        max_steps=5,
        save_every=1,
        progress=False,
        seed=0,
        lora=ct.LoraConfig(r=4) if args.lora else None,
        gradient_checkpointing=args.checkpointing,
        fsdp=args.fsdp,
        in_place=args.fsdp,  # so the callback can see the sharded training model
    )

    def stop(record):
        if args.fsdp and distributed.is_distributed():
            weight = model.blocks[0].ln1.w  # each rank holds half of every parameter
            assert weight.to_local().numel() * 2 == weight.numel(), type(weight)
        if args.stop_after is not None and record["step"] == args.stop_after:
            raise Stop

    try:
        ct.finetune(
            model, chats(), cfg, intervention=ablation, out=args.out, resume=args.resume,
            callback=stop,
        )  # fmt: skip
    except Stop:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
