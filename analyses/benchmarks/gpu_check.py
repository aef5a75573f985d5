#!/usr/bin/env python
"""The single-GPU check of the scale-out path, for a session with a GPU (none so far).

    python analyses/benchmarks/gpu_check.py [--out DIR]     # ~2 min on one GPU

On the embedded model, batch 8 x 256 tokens, a CAFT zero-ablation at three hooks, it runs
``finetune``'s step as the library does (bf16 autocast on CUDA) for: full fine-tuning in
float32 and in bfloat16 weights, each with and without gradient checkpointing, and LoRA
r=8 in bfloat16 (factored, merged, factored + checkpointing). For each it records the
median step time, ``torch.cuda.max_memory_allocated`` of a steady step, the estimator's
total, and the loss; it checks that checkpointing leaves the gradients unchanged (bf16
rounding aside) and that every loss is finite. Results: ``results/gpu_check.json`` (or
``--out``) and a Markdown table. Exits 1 without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = {
    # name: (dtype, lora, checkpointing, merged)
    "fp32": ("float32", False, False, False),
    "fp32_ckpt": ("float32", False, True, False),
    "bf16": ("bfloat16", False, False, False),
    "bf16_ckpt": ("bfloat16", False, True, False),
    "bf16_lora": ("bfloat16", True, False, False),
    "bf16_lora_merged": ("bfloat16", True, False, True),
    "bf16_lora_ckpt": ("bfloat16", True, True, False),
}
SEQ_LEN, BATCH, ROUNDS = 256, 8, 5


def run_variant(name: str, batch_cpu: dict, base_cpu) -> dict:
    import copy

    import torch
    from bench_train import make_interventions

    import caft_tl
    from caft_tl.lora import LoraConfig, apply_lora, merged_forward
    from caft_tl.memory import estimate_finetune_memory
    from caft_tl.train import (
        TrainConfig,
        applied,
        autocast_for,
        checkpointed_blocks,
        make_optimizer,
        target_loss_sum,
    )

    dtype, lora, ckpt, merged = VARIANTS[name]
    model = copy.deepcopy(base_cpu).to("cuda", getattr(torch, dtype))
    if lora:
        apply_lora(model, LoraConfig(r=8), generator=torch.Generator().manual_seed(0))
    model.train()
    batch = {k: v.cuda() for k, v in batch_cpu.items()}
    zero = make_interventions(model, batch)["zero"]
    optimizer = make_optimizer(model, TrainConfig(lr=1e-6))
    device = torch.device("cuda")

    def step() -> tuple[float, float]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with (
            torch.enable_grad(),
            applied(zero, model),
            checkpointed_blocks(model) if ckpt else contextlib.nullcontext(),
            merged_forward() if merged else contextlib.nullcontext(),
            autocast_for(device),
        ):
            loss, n = target_loss_sum(model, batch)
        (loss / n).backward()
        optimizer.step()
        torch.cuda.synchronize()
        return time.perf_counter() - start, float(loss / n)

    step()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    times, losses = [], []
    for _ in range(ROUNDS):
        t, loss = step()
        times.append(t)
        losses.append(loss)
    peak = torch.cuda.max_memory_allocated()
    est = estimate_finetune_memory(
        model.cfg,
        batch_size=BATCH,
        seq_len=SEQ_LEN,
        dtype=dtype,
        lora=LoraConfig(r=8) if lora else None,
        gradient_checkpointing=ckpt,
        lora_form="merged" if merged else "factored",
    )
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    del model, optimizer
    torch.cuda.empty_cache()
    return {
        "median_step_s": statistics.median(times),
        "peak_allocated_gib": peak / 2**30,
        "resident_before_step_gib": before / 2**30,
        "estimate_total_gib": est.total / 2**30,
        "loss": losses[-1],
        "finite": all(map(lambda x: x == x and abs(x) < 1e4, losses)),
        "_grads": grads,
        "caft_tl": caft_tl.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check")
        return 1
    import bench_train

    import caft_tl

    bench_train.SEQ_LEN = SEQ_LEN
    base = caft_tl.load_model(device="cpu")
    batch = bench_train.make_batch(base.tokenizer, n=BATCH)
    results = {name: run_variant(name, batch, base) for name in VARIANTS}
    checks = {}
    for plain, ckpt in (("fp32", "fp32_ckpt"), ("bf16_lora", "bf16_lora_ckpt")):
        a, b = results[plain]["_grads"], results[ckpt]["_grads"]
        worst = max(
            ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a
        )
        checks[f"{ckpt} vs {plain}: max relative gradient difference"] = worst
    for r in results.values():
        r.pop("_grads")
    out = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "batch": [BATCH, SEQ_LEN],
        "variants": results,
        "checks": checks,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(out, indent=2))
    print(f"{out['gpu']}, torch {out['torch']}, batch {BATCH} x {SEQ_LEN}")
    print("| variant | step s | peak GiB | estimate GiB | loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(
            f"| {name} | {r['median_step_s']:.3f} | {r['peak_allocated_gib']:.2f} | "
            f"{r['estimate_total_gib']:.2f} | {r['loss']:.3f} |"
        )
    for k, v in checks.items():
        print(f"- {k}: {v:.2e}")
    ok = all(r["finite"] for r in results.values()) and all(v < 0.05 for v in checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
