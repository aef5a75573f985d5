#!/usr/bin/env python
"""What the scale-out features cost and save, on the embedded SmolLM2-135M-Instruct (CPU,
fp32, 2 threads): LoRA in factored vs merged form, and gradient checkpointing.

    python analyses/benchmarks/bench_scale.py            # ~8 min on 2 idle cores
    python analyses/benchmarks/bench_scale.py --quick    # ~4 min

Every variant is one ``finetune`` step (zero_grad, forward with the attention mask, masked
cross-entropy on the target positions, backward, clipping, AdamW) on a batch of 8 x 128
tokens with a CAFT zero-ablation of 20 directions at blocks.10/15/20.hook_resid_post:

* ``full`` / ``full_ckpt``: every weight trains; without / with gradient checkpointing;
* ``lora`` / ``lora_merged`` / ``lora_ckpt``: LoRA r=8 on all seven projection types:
  factored (caft-tl's fast path), merged (``caft_tl.lora.merged_forward``: each adapted
  matrix materialised per forward, what caft-tl did before), factored + checkpointing.

1. Step time: the variants share one process and run interleaved, in a rotated order per
   round; ratios are medians of per-round ratios (the machine is shared and noisy).
2. Peak memory: a fresh subprocess per variant runs one step (AdamW state allocated), drops
   the gradients, then resets the RSS high-water mark and reads ``VmHWM`` after a second
   step, minus the RSS before it: what a steady-state step adds as the OS sees it. A third
   step runs under the profiler: the peak of live tensor bytes (what the estimator models;
   RSS also holds the allocator's free lists). Beside them, what
   :func:`caft_tl.memory.estimate_finetune_memory` predicts a step adds (gradients, saved
   activations, weight copies, logits; CPU has no autocast).

Results: ``results/scale.json`` (``scale_quick.json`` with ``--quick``) and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_foundation import (  # noqa: E402  (shared helpers of the sibling benchmark)
    emit,
    machine_info,
    malloc_trim,
    reset_peak_rss,
    run_child,
    vm_kib,
)
from bench_train import (  # noqa: E402
    make_batch,
    make_interventions,
    set_threads,
)

RESULTS_DIR = HERE / "results"
SEQ_LEN = 128
VARIANTS = ("full", "full_ckpt", "lora", "lora_merged", "lora_ckpt")
LORA_R = 8
MODES = {"full": {"rounds": 5}, "quick": {"rounds": 2}}


def _prepare(variant: str, base: Any) -> tuple[Any, Any]:
    """(model, optimizer) of a variant; LoRA variants adapt a copy of ``base``."""
    import copy

    import torch

    from caft_tl.lora import LoraConfig, apply_lora
    from caft_tl.train import TrainConfig, make_optimizer

    model = base
    if variant.startswith("lora"):
        model = copy.deepcopy(base)
        apply_lora(model, LoraConfig(r=LORA_R), generator=torch.Generator().manual_seed(0))
    return model.train(), make_optimizer(model, TrainConfig(lr=1e-6))


def step_fn(variant: str, model: Any, optimizer: Any, batch: dict, intervention: Any):
    import torch

    from caft_tl.lora import merged_forward
    from caft_tl.train import applied, checkpointed_blocks, target_loss_sum

    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with (
            torch.enable_grad(),
            applied(intervention, model),
            checkpointed_blocks(model) if variant.endswith("ckpt") else contextlib.nullcontext(),
            merged_forward() if variant == "lora_merged" else contextlib.nullcontext(),
        ):
            loss, n = target_loss_sum(model, batch)
            (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return time.perf_counter() - start

    return step


def _batch(model: Any) -> dict:
    import bench_train

    bench_train.SEQ_LEN = SEQ_LEN  # make_batch reads the module's length
    return make_batch(model.tokenizer)


def bench_steps(cfg: dict[str, Any]) -> dict[str, Any]:
    import caft_tl

    base = caft_tl.load_model(device="cpu")
    batch = _batch(base)
    zero = make_interventions(base, batch)["zero"]
    steps = {}
    for variant in VARIANTS:
        model, optimizer = _prepare(variant, base)
        steps[variant] = step_fn(variant, model, optimizer, batch, zero)
        steps[variant]()  # warm-up: allocates AdamW's state
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(cfg["rounds"]):
        shift = r % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            times[variant].append(steps[variant]())
        print(
            f"[steps] round {r + 1}/{cfg['rounds']}: "
            + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in VARIANTS),
            flush=True,
        )

    def ratio(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    return {
        "seconds": times,
        "median_s": {v: statistics.median(t) for v, t in times.items()},
        "ratios": {
            "full_ckpt / full": ratio("full_ckpt", "full"),
            "lora / full": ratio("lora", "full"),
            "lora / lora_merged": ratio("lora", "lora_merged"),
            "lora_ckpt / lora": ratio("lora_ckpt", "lora"),
        },
    }


def child_memory(variant: str) -> None:
    set_threads()
    import caft_tl
    from caft_tl.memory import estimate_finetune_memory

    base = caft_tl.load_model(device="cpu")
    batch = _batch(base)
    zero = make_interventions(base, batch)["zero"]
    model, optimizer = _prepare(variant, base)
    if model is not base:
        del base
    step = step_fn(variant, model, optimizer, batch, zero)
    step()  # AdamW's state
    optimizer.zero_grad(set_to_none=True)  # the step allocates its gradients itself
    gc.collect()
    malloc_trim()
    before = vm_kib("VmRSS")
    reset_ok = reset_peak_rss()
    seconds = step()
    peak = vm_kib("VmHWM")
    optimizer.zero_grad(set_to_none=True)
    live = _live_peak(step)
    lora = caft_tl.LoraConfig(r=LORA_R) if variant.startswith("lora") else None
    n_targets = int(batch["loss_mask"][:, 1:].sum())
    est = estimate_finetune_memory(
        model.cfg,
        batch_size=batch["input_ids"].shape[0],
        seq_len=SEQ_LEN,
        lora=lora,
        autocast_bf16=False,
        gradient_checkpointing=variant.endswith("ckpt"),
        lora_form="merged" if variant == "lora_merged" else "factored",
    )
    # What a steady step allocates: gradients (freed by zero_grad(set_to_none)), what is
    # saved for backward, and the logits of the target positions.
    logits = 2 * n_targets * model.cfg.d_vocab * 4
    predicted = est.gradients + est.lora_merged + est.weight_copies + est.activations + logits
    emit(
        {
            "variant": variant,
            "step_peak_delta_mib": (peak - before) / 1024,
            "live_tensor_peak_mib": live / 2**20,
            "estimated_step_mib": predicted / 2**20,
            "estimate": est.to_dict(),
            "second_step_s": seconds,
            "peak_reset_ok": reset_ok,
        }
    )


def _live_peak(step: Any) -> int:
    """Peak bytes of live tensors during ``step()``, from the profiler's allocation records
    (what the estimator models; the RSS also holds the allocator's free lists)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.function_events if e.self_cpu_memory_usage != 0]
    events.sort(key=lambda e: e.time_range.start)
    now = peak = 0
    for event in events:
        now += event.self_cpu_memory_usage
        peak = max(peak, now)
    return peak


def bench_memory() -> dict[str, Any]:
    runs = {}
    for variant in VARIANTS:
        print(f"[memory] {variant} (fresh subprocess) ...", flush=True)
        runs[variant] = run_child(["--child", "memory", "--variant", variant], Path(__file__))
    return runs


def table(result: dict[str, Any]) -> str:
    steps, memory = result["steps"], result["memory"]
    base = steps["median_s"]["full"]
    rows = [
        "| variant | step s (median) | vs full | RSS peak growth MiB | live tensors MiB "
        "| estimate MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in VARIANTS:
        m = memory[v]
        rows.append(
            f"| {v} | {steps['median_s'][v]:.2f} | {steps['median_s'][v] / base:.2f}x | "
            f"{m['step_peak_delta_mib']:.0f} | {m['live_tensor_peak_mib']:.0f} | "
            f"{m['estimated_step_mib']:.0f} |"
        )
    rows.append("")
    rows += [f"- {k}: {v:.2f}x (median of per-round ratios)" for k, v in steps["ratios"].items()]
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "memory":
        child_memory(args.variant)
        return 0
    set_threads()
    mode = "quick" if args.quick else "full"
    started = time.perf_counter()
    result = {
        "mode": mode,
        "machine": machine_info(),
        "batch": [8, SEQ_LEN],
        "lora_r": LORA_R,
        "steps": bench_steps(MODES[mode]),
        "memory": bench_memory(),
    }
    result["wall_s"] = time.perf_counter() - started
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / ("scale_quick.json" if args.quick else "scale.json")
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
