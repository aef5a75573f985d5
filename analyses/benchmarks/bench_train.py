#!/usr/bin/env python
"""Fine-tuning benchmarks for caft-tl: the cost of a CAFT training step, its memory, and
checkpoint / resume overhead, on the embedded SmolLM2-135M-Instruct (CPU, fp32, 2 threads).

    python analyses/benchmarks/bench_train.py            # full run, ~10 min on 2 idle cores
    python analyses/benchmarks/bench_train.py --quick    # smoke run, ~4 min

1. Step time: one full fine-tuning step (zero_grad, forward with the attention mask, masked
   cross-entropy, backward, gradient clipping, AdamW) on a batch of 8 x 64 tokens, exactly
   as ``caft_tl.train.finetune`` runs it (same helpers), with each intervention installed
   by ``intervention.applied(model)``: none, Ablation zero / mean / detached / gradient and
   Steering, at blocks.10/15/20.hook_resid_post with 20 random orthonormal directions per
   hook. The same step on the Hugging Face model (same GGUF weights, fp32) runs without
   hooks and with ``register_forward_hook`` on decoder layers 10/15/20 applying
   ``h - (h @ Q) @ Q.T`` (zero ablation); ``tl_none`` / ``tl_zero`` run our step with
   ``caft_tl.fast`` switched off (TransformerLens's own forward). All variants share one
   process and are interleaved: every round runs each variant once, in a rotated order,
   and ratios are medians of per-round ratios (``wall_median_ci95``: a 95% bootstrap
   interval of that median, over the rounds).
2. Peak memory of a step: a fresh subprocess per variant loads the model, sets up the
   optimiser, returns freed heap to the OS, resets the RSS high-water mark and reads
   ``VmHWM`` from /proc/self/status after the step, minus the RSS before it (first step,
   which allocates AdamW's state, and a second, steady-state step). ``ru_maxrss`` is not
   used: it carries the parent's peak into a child.
3. Loss paths (``--only losspaths``): the same step through each way of computing the loss,
   on an unpadded batch (8 x 64 real tokens) and a padded one (lengths 64 down to 32,
   right-padded), without hooks and with zero-ablation: caft-tl's masked loss
   (``target_loss_sum``), TransformerLens's ``model(..., return_type="loss")``, and on the HF
   model the same masked loss and HF's own ``labels=`` loss. Ratios per round, medians, of
   wall and CPU time, and the ratio of the fastest steps (``--rounds N`` for more rounds).
4. Profile (``--only profile``, never by default): the unpadded loss-path step of ours and
   of HF (``labels=``), without hooks and with zero-ablation, under ``torch.profiler``: self
   CPU time per operator and input shape, summed by phase (forward, backward, optimiser) and
   by kind (matrix products, attention, the rest), and the operators whose time differs most.
   Profiling slows small operators more than large ones, so it says where a gap is, not
   how big it is.
5. Checkpoints: ``finetune(out=..., save_every=1)`` timed from inside (the library's
   checkpoint writer and reader are wrapped with timers): the time to write one checkpoint
   (weights + AdamW state + scheduler + RNG, atomically, fsynced), and the time from calling
   ``finetune`` to the end of the first step for a fresh start and for a resume.

Results: ``results/train.json`` (``train_quick.json`` with ``--quick``), with machine
information; a Markdown table is printed at the end. The machine is shared and noisy:
compare ratios measured within one run, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_foundation import (  # noqa: E402  (shared helpers of the sibling benchmark)
    THREADS,
    emit,
    load_hf,
    machine_info,
    make_texts,
    malloc_trim,
    reset_peak_rss,
    run_child,
    vm_kib,
)

RESULTS_DIR = HERE / "results"
BATCH_SIZE = 8
SEQ_LEN = 64
LAYERS = (10, 15, 20)
HOOKS = [f"blocks.{layer}.hook_resid_post" for layer in LAYERS]
N_DIRECTIONS = 20
LR = 1e-6  # tiny: the weights barely move while every variant trains the same model
OURS = ("none", "zero", "mean", "detached", "gradient", "steering")
# The same model and optimiser with caft_tl.fast switched off for the step: TransformerLens's
# own forward, what caft-tl ran before the fast paths.
TL = ("tl_none", "tl_zero")
HF = ("hf_none", "hf_zero")
TARGET_RATIO = 1.05
KINDS = ("wall", "cpu", "fwd_bwd")

MODES = {
    "full": {
        "rounds": 6,
        "memory_variants": [*OURS, "tl_zero", "hf_zero"],
        "checkpoint_reps": 2,
        "profile_reps": 3,
        "profile_top": 40,
    },
    "quick": {
        "rounds": 3,
        "memory_variants": ["zero", "tl_zero", "hf_zero"],
        "checkpoint_reps": 1,
        "profile_reps": 1,
        "profile_top": 20,
    },
}


# =============================================================================== setup


def set_threads() -> None:
    """The benchmark's torch thread count (shared by every child process)."""
    import torch

    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def make_batch(tokenizer: Any, n: int = BATCH_SIZE, seed: int = 0) -> dict[str, Any]:
    """``n`` rows of exactly ``SEQ_LEN`` tokens of generated English (no padding)."""
    from caft_tl.data import DataWarning, collate, pad_id, tokenize

    paragraphs = make_texts(4 * n, seed)
    texts = [" ".join(paragraphs[4 * i : 4 * i + 4]) for i in range(n)]  # >= 120 tokens each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # truncation to SEQ_LEN is intended
        ds = tokenize(texts, tokenizer, max_length=SEQ_LEN)
    assert all(k == SEQ_LEN for k in ds["n_tokens"]), ds["n_tokens"]
    rows = [
        {"input_ids": r, "loss_mask": m}
        for r, m in zip(ds["input_ids"], ds["loss_mask"], strict=True)
    ]
    return collate(rows, pad_token_id=pad_id(tokenizer), padding_side="right")


def make_interventions(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """``{variant: intervention or None}`` for our variants, means fitted on ``batch``."""
    import torch

    from caft_tl.directions import ConceptSet, random_directions
    from caft_tl.interventions import Ablation, Steering, mean_activations

    like = ConceptSet({h: torch.zeros(N_DIRECTIONS, model.cfg.d_model) for h in HOOKS})
    concepts = random_directions(like, seed=0)
    mean = mean_activations(
        model, HOOKS, [{"input_ids": batch["input_ids"], "mask": batch["attention_mask"]}]
    )
    return {
        "none": None,
        "zero": Ablation(concepts, mode="zero"),
        "mean": Ablation(concepts, mode="mean", mean=mean),
        "detached": Ablation(concepts, mode="detached"),
        "gradient": Ablation(concepts, mode="gradient"),
        "steering": Steering(concepts, coef=-1.0, mean=mean),
    }


def make_optimizer(model: Any):
    """The library's optimiser at the benchmark's learning rate."""
    from caft_tl.train import TrainConfig
    from caft_tl.train import make_optimizer as library_optimizer

    return library_optimizer(model, TrainConfig(lr=LR))


def _timings(start: float, cpu: float, fwd_bwd: float) -> dict[str, float]:
    """Wall time, CPU time of the whole process (all threads) and forward+backward wall time
    of a step. CPU time is less sensitive than wall time to other jobs on a shared machine."""
    return {
        "wall": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "fwd_bwd": fwd_bwd,
    }


def ours_step_fn(
    model: Any,
    batch: dict[str, Any],
    intervention: Any,
    optimizer: Any,
    plain: bool = False,
    tl_loss: bool = False,
):
    """One step of ``finetune``'s loop (grad_accum 1); the step returns its timings.
    ``plain``: with TransformerLens's own forward instead of ``caft_tl.fast``'s; ``tl_loss``:
    the loss from ``model(..., return_type="loss")`` (TransformerLens's full log-softmax)
    instead of caft-tl's masked loss."""
    import torch

    from caft_tl.fast import plain_forward
    from caft_tl.train import applied, target_loss_sum

    params = [p for g in optimizer.param_groups for p in g["params"]]

    def loss_of_step():
        if tl_loss:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            return model(ids, attention_mask=mask, return_type="loss")
        loss, n = target_loss_sum(model, batch)
        return loss / n

    def step() -> dict[str, float]:
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with (
            torch.enable_grad(),
            plain_forward(model) if plain else contextlib.nullcontext(),
            applied(intervention, model),
        ):
            loss = loss_of_step()
            loss.backward()
            loss.item()
        fwd_bwd = time.perf_counter() - start
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return _timings(start, cpu, fwd_bwd)

    return step


def _hf_ablation(qmat: Any):
    """A forward hook on an HF decoder layer: ``h - (h @ Q) @ Q.T`` on its output."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h - (h @ qmat) @ qmat.T
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


def hf_step_fn(
    hf: Any, batch: dict[str, Any], q: dict[int, Any] | None, optimizer: Any, labels: bool = False
):
    """The same step on the HF model; ``q``: ``{layer: Q [d, k]}`` ablated by forward hooks.
    The loss is caft-tl's masked loss on HF's logits, or with ``labels`` HF's own ``labels=``
    loss (-100 on padding)."""
    import torch

    from caft_tl.train import masked_loss_sum

    params = [p for g in optimizer.param_groups for p in g["params"]]
    targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_of_step():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if labels:
            return hf(ids, attention_mask=mask, labels=targets).loss
        logits = hf(ids, attention_mask=mask).logits
        loss, n = masked_loss_sum(logits, ids, batch["loss_mask"])
        return loss / n

    def step() -> dict[str, float]:
        start, cpu = time.perf_counter(), time.process_time()
        handles = [
            hf.model.layers[i].register_forward_hook(_hf_ablation(m)) for i, m in (q or {}).items()
        ]
        try:
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_of_step()
                loss.backward()
                loss.item()
        finally:
            for handle in handles:
                handle.remove()
        fwd_bwd = time.perf_counter() - start
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return _timings(start, cpu, fwd_bwd)

    return step


def hf_setup(batch: dict[str, Any], interventions: dict[str, Any]):
    """The HF model in train mode, its AdamW, and the step functions of the HF variants."""
    import torch

    hf = load_hf().train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0)
    concepts = interventions["zero"].concepts
    q = {layer: concepts[h].T.contiguous() for layer, h in zip(LAYERS, HOOKS, strict=True)}
    return (
        hf,
        optimizer,
        {
            "hf_none": hf_step_fn(hf, batch, None, optimizer),
            "hf_zero": hf_step_fn(hf, batch, q, optimizer),
        },
        q,
    )


class Setup(NamedTuple):
    """What the step, loss-path and profile benchmarks share: our model in train mode, the
    unpadded batch, the interventions fitted on it, our AdamW and the HF side."""

    model: Any
    batch: dict[str, Any]
    interventions: dict[str, Any]
    optimizer: Any
    hf: Any
    hf_optimizer: Any
    hf_steps: dict[str, Any]
    q: dict[int, Any]


def load_setup(tag: str) -> Setup:
    """Load both models and build the shared pieces (:class:`Setup`)."""
    import caft_tl

    print(f"[{tag}] loading the TransformerLens and HF models ...", flush=True)
    model = caft_tl.load_model(device="cpu").train()
    batch = make_batch(model.tokenizer)
    interventions = make_interventions(model, batch)
    optimizer = make_optimizer(model)
    return Setup(model, batch, interventions, optimizer, *hf_setup(batch, interventions))


def check_equivalence(model: Any, hf: Any, batch: dict[str, Any], zero: Any, q) -> dict[str, float]:
    """Max |logit difference| between the TL and HF models, without and with the ablation
    (shows the HF hooks do what the TL intervention does)."""
    import torch

    out = {}
    ids, mask = batch["input_ids"][:2], batch["attention_mask"][:2]
    with torch.no_grad():
        for name, intervention, qq in (("none", None, None), ("zero", zero, q)):
            handles = []
            if qq:
                for layer, qmat in qq.items():
                    handles.append(hf.model.layers[layer].register_forward_hook(_hf_ablation(qmat)))
            try:
                hf_logits = hf(ids, attention_mask=mask).logits
            finally:
                for handle in handles:
                    handle.remove()
            ctx = intervention.applied(model) if intervention else contextlib.nullcontext()
            with ctx:
                tl_logits = model(ids, attention_mask=mask)
            out[name] = (hf_logits - tl_logits).abs().max().item()
    return out


# =============================================================================== step time


Times = dict[str, dict[str, list[float]]]


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` in round ``r``'s order: rotated by ``r``, so nobody always runs first or
    last."""
    shift = r % len(names)
    return names[shift:] + names[:shift]


def interleaved_times(steps: dict[str, Any], rounds: int, tag: str, walls: bool = False) -> Times:
    """Every step function once per round, in an order rotated each round (nobody always
    runs first or last): ``{step: {kind: [one timing per round]}}``. ``walls``: print each
    round's wall times, not only its number."""
    names = list(steps)
    times: Times = {n: {k: [] for k in KINDS} for n in names}
    for r in range(rounds):
        for name in rotated(names, r):
            for kind, value in steps[name]().items():
                times[name][kind].append(value)
        line = f"[{tag}] round {r + 1}/{rounds}"
        if walls:
            line += " (wall s): " + ", ".join(f"{n} {times[n]['wall'][-1]:.2f}" for n in names)
        print(line, flush=True)
    return times


def median_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """A 95% bootstrap interval of the median of ``values`` (rounds resampled with
    replacement, a fixed seed): whether a median ratio is distinguishable from 1."""
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def paired_ratio(times: Times, num: str, den: str) -> dict[str, Any]:
    """Step ``num`` over step ``den``: medians (and the wall-time range) of the per-round
    ratios, and the ratio of their fastest steps, the least disturbed by other jobs."""

    def per_round(kind: str) -> list[float]:
        return [a / b for a, b in zip(times[num][kind], times[den][kind], strict=True)]

    wall = per_round("wall")
    return {
        "wall_median": statistics.median(wall),
        "wall_median_ci95": median_interval(wall),
        "wall_min": min(wall),
        "wall_max": max(wall),
        # CPU time is less sensitive to other jobs than wall time.
        "cpu_median": statistics.median(per_round("cpu")),
        "fwd_bwd_median": statistics.median(per_round("fwd_bwd")),
        "of_minima": min(times[num]["wall"]) / min(times[den]["wall"]),
    }


def bench_steps(cfg: dict[str, Any]) -> dict[str, Any]:
    model, batch, interventions, optimizer, hf, hf_opt, hf_steps, q = load_setup("steps")
    steps = {name: ours_step_fn(model, batch, iv, optimizer) for name, iv in interventions.items()}
    for name in TL:
        iv = interventions[name.removeprefix("tl_")]
        steps[name] = ours_step_fn(model, batch, iv, optimizer, plain=True)
    steps.update(hf_steps)
    equivalence = check_equivalence(model, hf, batch, interventions["zero"], q)
    print(f"[steps] max |logit diff| TL vs HF: {equivalence}", flush=True)

    names = list(steps)
    print("[steps] warm-up: one step of each model (allocates the AdamW states) ...", flush=True)
    warmup = {name: steps[name]()["wall"] for name in ("none", "hf_none")}
    times = interleaved_times(steps, cfg["rounds"], "steps", walls=True)

    variants = {}
    for name in names:
        ref = {"hf": "hf_none", "tl": "tl_none"}.get(name[:2], "none")
        row: dict[str, Any] = {f"{k}_s": times[name][k] for k in KINDS}
        row.update({f"{k}_s_median": statistics.median(times[name][k]) for k in KINDS})
        row["wall_s_min"] = min(times[name]["wall"])
        row["reference"] = ref
        if name in warmup:
            row["warmup_step_s"] = warmup[name]
        if name != ref:
            row["ratio_to_reference"] = paired_ratio(times, name, ref)
        variants[name] = row
    ours_vs_hf = {iv: paired_ratio(times, iv, f"hf_{iv}") for iv in ("zero", "none")}
    ours_vs_tl = {iv: paired_ratio(times, iv, f"tl_{iv}") for iv in ("zero", "none")}
    tl_vs_hf = {iv: paired_ratio(times, f"tl_{iv}", f"hf_{iv}") for iv in ("zero", "none")}
    result = {
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "hooks": HOOKS,
        "directions_per_hook": N_DIRECTIONS,
        "rounds": cfg["rounds"],
        "n_params_tl": sum(p.numel() for p in model.parameters()),
        "n_params_hf": sum(p.numel() for p in hf.parameters()),
        "logit_max_abs_diff_tl_vs_hf": equivalence,
        "variants": variants,
        "ratio_ours_over_hf_median": ours_vs_hf,
        "ratio_ours_over_plain_tl_median": ours_vs_tl,
        "ratio_plain_tl_over_hf_median": tl_vs_hf,
    }
    del model, hf, optimizer, hf_opt, steps, hf_steps, interventions, times
    gc.collect()
    return result


# =============================================================================== loss paths


def make_padded_batch(tokenizer: Any, n: int = BATCH_SIZE, seed: int = 1) -> dict[str, Any]:
    """``n`` rows of ``SEQ_LEN`` down to about half of it, right-padded to ``SEQ_LEN`` (a
    chat batch's shape): the loss and the attention see only real tokens."""
    from caft_tl.data import collate, pad_id

    full = make_batch(tokenizer, n, seed)
    lengths = [SEQ_LEN - (SEQ_LEN // 2) * i // max(1, n - 1) for i in range(n)]
    rows = [
        {"input_ids": full["input_ids"][i, :k].tolist(), "loss_mask": [1] * k}
        for i, k in enumerate(lengths)
    ]
    return collate(rows, pad_token_id=pad_id(tokenizer), padding_side="right")


LOSS_PATHS = {
    "ours": "caft-tl's masked loss (target_loss_sum: logits only where a target is)",
    "tlloss": 'TransformerLens\'s return_type="loss" (full log-softmax)',
    "hf": "HF model, the same masked loss on its logits",
    "hflabels": "HF model's own labels= loss",
}


# What issue 21's target compares: our step and HF's `labels=` step on the unpadded batch.
TARGET_PATHS = ("ours", "hflabels")
RATIOS = {  # ratio name: (numerator path, denominator path)
    "ours_over_hf": ("ours", "hf"),
    "ours_over_hflabels": ("ours", "hflabels"),
    "tlloss_over_hflabels": ("tlloss", "hflabels"),
}


def loss_path_steps(setup: Setup, batch: dict[str, Any], kind: str, paths: tuple[str, ...]):
    """``{f"{path}_{kind}_{iv}": step}`` for each loss path, without hooks and with
    zero-ablation."""

    def step(path: str, iv: str):
        if path in ("ours", "tlloss"):
            return ours_step_fn(
                setup.model,
                batch,
                setup.interventions[iv],
                setup.optimizer,
                tl_loss=path == "tlloss",
            )
        q = setup.q if iv == "zero" else None
        return hf_step_fn(setup.hf, batch, q, setup.hf_optimizer, labels=path == "hflabels")

    return {f"{path}_{kind}_{iv}": step(path, iv) for iv in ("none", "zero") for path in paths}


def bench_loss_paths(cfg: dict[str, Any], target: bool = False) -> dict[str, Any]:
    """Each loss path on an unpadded (8 x 64 real tokens) and a padded batch, with no
    intervention and with zero-ablation, interleaved as in :func:`bench_steps`. ``target``:
    only :data:`TARGET_PATHS` on the unpadded batch, for more rounds in the same time."""
    setup = load_setup("loss paths")
    batches = {"unpadded": setup.batch}
    if not target:
        batches["padded"] = make_padded_batch(setup.model.tokenizer)
    paths = TARGET_PATHS if target else tuple(LOSS_PATHS)
    steps = {}
    for kind, batch in batches.items():
        steps.update(loss_path_steps(setup, batch, kind, paths))
    for name in ("ours_unpadded_none", "hflabels_unpadded_none"):  # the AdamW states
        steps[name]()
    times = interleaved_times(steps, cfg["rounds"], "loss paths")

    ratios = {}
    for kind in batches:
        for iv in ("none", "zero"):
            case = f"{kind}_{iv}"
            ratios[case] = {
                name: paired_ratio(times, f"{num}_{case}", f"{den}_{case}")
                for name, (num, den) in RATIOS.items()
                if num in paths and den in paths
            }
    result = {
        "paths": {path: LOSS_PATHS[path] for path in paths},
        "padded_lengths": batches["padded"]["attention_mask"].sum(1).tolist()
        if "padded" in batches
        else None,
        "wall_s_median": {n: statistics.median(t["wall"]) for n, t in times.items()},
        "wall_s_min": {n: min(t["wall"]) for n, t in times.items()},
        "cpu_s_median": {n: statistics.median(t["cpu"]) for n, t in times.items()},
        "ratios": ratios,
    }
    del setup, steps
    gc.collect()
    return result


# =============================================================================== profile

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
PHASES = (("Optimizer.step", "optimizer"), ("autograd::engine::evaluate_function", "backward"))
KINDS_OF_OPS = ("products", "attention", "rest")
STEP_LABEL = "bench step: "


def _labels(event: Any) -> tuple[str | None, str]:
    """The step (its ``record_function`` label) and the part of it (forward, backward,
    optimiser) that a profiler event ran in, from its ancestors' names."""
    step, phase, parent = None, None, event.cpu_parent
    while parent is not None:
        if parent.name.startswith(STEP_LABEL):
            step = parent.name.removeprefix(STEP_LABEL)
        for prefix, name in PHASES:
            if phase is None and parent.name.startswith(prefix):
                phase = name
        parent = parent.cpu_parent
    return step, phase or "forward"  # forward: with zero_grad and gradient clipping


def _kind(event: Any) -> str:
    """``products``, ``attention`` or ``rest``: what kind of work a profiler event is."""
    if event.name in PRODUCTS:
        return "products"
    return "attention" if "scaled_dot_product" in event.name else "rest"


def profile_self_ms(steps: dict[str, Any], reps: int) -> dict[str, dict[str, Any]]:
    """Self CPU time (ms per step) of each operator of each step function, over ``reps``
    rounds in one profiler session, the steps alternating in rotated order (so that other
    jobs' load falls on all of them): by operator and input shapes, by operator alone, by
    phase and by kind (matrix products, attention, the rest)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    names = list(steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for r in range(reps):
            for name in rotated(names, r):
                with torch.profiler.record_function(STEP_LABEL + name):
                    steps[name]()
    out = {n: {"ops": {}, "by_name": {}, "phases": {}, "kinds": {}} for n in names}
    for e in prof.events():
        name, phase = _labels(e)
        if name not in out:
            continue  # the labels themselves
        ms, rec = e.self_cpu_time_total / 1e3 / reps, out[name]
        key = f"{e.name} {e.input_shapes}" if e.input_shapes else e.name
        for table, k in (("ops", key), ("by_name", e.name), ("phases", phase), ("kinds", _kind(e))):
            rec[table][k] = rec[table].get(k, 0.0) + ms
    for rec in out.values():
        rec["kinds"] = {k: rec["kinds"].get(k, 0.0) for k in KINDS_OF_OPS}
        rec["total"] = sum(rec["phases"].values())
    return out


def _largest_differences(ops: dict[str, dict[str, float]], top: int) -> list[dict[str, Any]]:
    """The ``top`` operators whose time differs most between ``ops["ours"]`` and
    ``ops["hf"]``, with both times."""
    ours, hf = ops["ours"], ops["hf"]
    diff = {k: ours.get(k, 0.0) - hf.get(k, 0.0) for k in set(ours) | set(hf)}
    keys = sorted(diff, key=lambda k: -abs(diff[k]))[:top]
    return [{"op": k, "ours": ours.get(k, 0.0), "hf": hf.get(k, 0.0)} for k in keys]


def bench_profile(cfg: dict[str, Any]) -> dict[str, Any]:
    """Where ours and HF's step differ: the unpadded step of the loss-path benchmark (ours:
    caft-tl's masked loss; HF: its ``labels=`` loss), without hooks and with zero-ablation,
    under ``torch.profiler``, with the operators whose time differs most. Profiling slows
    small operators more than large ones: read the ratios from ``--only losspaths``."""
    model, batch, interventions, optimizer, hf, hf_opt, _, q = load_setup("profile")
    result: dict[str, Any] = {"reps": cfg["profile_reps"]}
    for iv in ("none", "zero"):
        qq = q if iv == "zero" else None
        steps = {
            "ours": ours_step_fn(model, batch, interventions[iv], optimizer),
            "hf": hf_step_fn(hf, batch, qq, hf_opt, labels=True),
        }
        for step in (*steps.values(), *steps.values()):  # AdamW state, warm allocator
            step()
        prof = profile_self_ms(steps, cfg["profile_reps"])
        result[iv] = {
            "total_ms": {n: p["total"] for n, p in prof.items()},
            "phases_ms": {n: p["phases"] for n, p in prof.items()},
            "kinds_ms": {n: p["kinds"] for n, p in prof.items()},
            # By name alone: the two models lay out the same products differently, so the
            # same work often has other shapes.
            "largest_differences_by_op_ms": _largest_differences(
                {n: p["by_name"] for n, p in prof.items()}, cfg["profile_top"]
            ),
            "largest_differences_by_op_and_shape_ms": _largest_differences(
                {n: p["ops"] for n, p in prof.items()}, cfg["profile_top"]
            ),
        }
        print(f"[profile] {iv}: self CPU ms per step {result[iv]['total_ms']}", flush=True)
    del model, hf, optimizer, hf_opt, steps
    gc.collect()
    return result


# =============================================================================== memory


def child_memory(variant: str) -> None:
    """Peak RSS growth of the first and of a second step of one variant (fresh process)."""
    set_threads()
    import caft_tl

    model = caft_tl.load_model(device="cpu", fast=not variant.startswith("tl_")).train()
    batch = make_batch(model.tokenizer)
    interventions = make_interventions(model, batch)
    if variant.startswith("hf_"):
        hf, optimizer, hf_steps, _ = hf_setup(batch, interventions)
        del model  # the HF child holds only the HF model
        step = hf_steps[variant]
        n_params = sum(p.numel() for p in hf.parameters())
    else:
        optimizer = make_optimizer(model)
        step = ours_step_fn(model, batch, interventions[variant.removeprefix("tl_")], optimizer)
        n_params = sum(p.numel() for p in model.parameters())
    gc.collect()
    malloc_trim()
    rss_before = vm_kib("VmRSS")
    reset_ok = reset_peak_rss()
    t1 = step()["wall"]
    peak1 = vm_kib("VmHWM")
    rss_between = vm_kib("VmRSS")
    reset_ok = reset_peak_rss() and reset_ok
    t2 = step()["wall"]
    peak2 = vm_kib("VmHWM")
    emit(
        {
            "variant": variant,
            "n_params": n_params,
            "rss_before_mib": rss_before / 1024,
            "first_step_peak_delta_mib": (peak1 - rss_before) / 1024,
            "rss_after_first_step_mib": rss_between / 1024,
            "second_step_peak_delta_mib": (peak2 - rss_between) / 1024,
            "first_step_s": t1,
            "second_step_s": t2,
            "peak_reset_ok": reset_ok,
        }
    )


def bench_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    runs = {}
    for variant in cfg["memory_variants"]:
        print(f"[memory] {variant} (fresh subprocess) ...", flush=True)
        runs[variant] = run_child(["--child", "memory", "--variant", variant], Path(__file__))
    return {"runs": runs}


# =============================================================================== checkpoints


def bench_checkpoint(cfg: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint write time and time-to-first-step, fresh vs resumed, inside finetune."""
    import caft_tl
    from caft_tl import train
    from caft_tl.data import DataWarning, tokenize
    from caft_tl.train import loop, run_folder

    print("[checkpoint] fresh runs killed after step 1, then resumed ...", flush=True)
    model = caft_tl.load_model(device="cpu")
    paragraphs = make_texts(4 * 2 * BATCH_SIZE, 1)
    texts = [" ".join(paragraphs[4 * i : 4 * i + 4]) for i in range(2 * BATCH_SIZE)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = tokenize(texts, model.tokenizer, max_length=SEQ_LEN)
    run_cfg = caft_tl.TrainConfig(
        max_steps=3, batch_size=BATCH_SIZE, lr=LR, save_every=1, progress=False
    )
    timings: dict[str, list[float]] = {"save": [], "load": []}
    # finetune looks these up in the modules that call them at each call, so the wrappers
    # see every save and both halves of a load (weights, then optimiser / schedule / RNG).
    patched = [
        (run_folder, "save_checkpoint", "save"),
        (run_folder, "load_checkpoint_weights", "load"),
        (loop, "load_checkpoint_training", "load"),
    ]
    originals = [getattr(module, name) for module, name, _ in patched]

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[key].append(time.perf_counter() - start)

        return wrapper

    class Stop(Exception):
        pass

    reps = []
    for (module, name, key), original in zip(patched, originals, strict=True):
        setattr(module, name, timed(original, key))
    tmp = Path(tempfile.mkdtemp(prefix="caft-bench-ckpt-"))
    try:
        for rep in range(cfg["checkpoint_reps"]):
            out = tmp / f"run{rep}"
            got: dict[str, float] = {}

            def stop_at(step, key, start, got=got):
                def callback(record):
                    if record["step"] == step:
                        got[key] = time.perf_counter() - start
                        got[key + "_save"] = timings["save"][-1]
                        raise Stop

                return callback

            start = time.perf_counter()
            with contextlib.suppress(Stop):
                train.finetune(model, data, run_cfg, out=out, callback=stop_at(1, "fresh", start))
            gc.collect()
            start = time.perf_counter()
            with contextlib.suppress(Stop):
                train.finetune(
                    model,
                    data,
                    run_cfg,
                    out=out,
                    resume=True,
                    callback=stop_at(2, "resumed", start),
                )
            gc.collect()
            ckpt = out / "checkpoint"
            sizes = {p.name: p.stat().st_size / 2**20 for p in ckpt.iterdir() if p.is_file()}
            reps.append(
                {
                    # The callback runs after the step's checkpoint: subtract its write time.
                    "fresh_first_step_s": got["fresh"] - got["fresh_save"],
                    "resumed_first_step_s": got["resumed"] - got["resumed_save"],
                    "load_s": sum(timings["load"][-2:]),
                    "checkpoint_mib": sum(sizes.values()),
                    "checkpoint_files_mib": sizes,
                }
            )
            shutil.rmtree(out)
    finally:
        for (module, name, _), original in zip(patched, originals, strict=True):
            setattr(module, name, original)
        shutil.rmtree(tmp, ignore_errors=True)
    fresh = statistics.median(r["fresh_first_step_s"] for r in reps)
    resumed = statistics.median(r["resumed_first_step_s"] for r in reps)
    del model
    gc.collect()
    return {
        "reps": reps,
        "save_s": timings["save"],
        "save_s_median": statistics.median(timings["save"]),
        "load_s_median": statistics.median(r["load_s"] for r in reps),
        "checkpoint_mib": reps[0]["checkpoint_mib"],
        "fresh_first_step_s_median": fresh,
        "resumed_first_step_s_median": resumed,
        "ratio_resumed_over_fresh": resumed / fresh,
        "resume_overhead_s": resumed - fresh,
    }


# =============================================================================== report


def _interval(ratio: dict[str, Any]) -> str:
    low, high = ratio["wall_median_ci95"]
    return f"{low:.2f}-{high:.2f}"


def markdown_table(res: dict[str, Any]) -> str:
    rows = [("measurement", "value", "ratio / note"), ("---", "---:", "---")]
    st = res.get("steps")
    if st:
        v = st["variants"]
        shape = f"batch {st['batch_size']} x {st['seq_len']} tok"
        for name in OURS:
            row = v[name]
            value = f"{row['wall_s_median']:.2f} s (CPU {row['cpu_s_median']:.2f} s)"
            if name == "none":
                note = f"reference ({shape}; fwd+bwd {row['fwd_bwd_s_median']:.2f} s)"
            else:
                r = row["ratio_to_reference"]
                flag = "" if r["wall_median"] <= TARGET_RATIO else " (above 1.05x)"
                note = (
                    f"**{r['wall_median']:.3f}x** none{flag}; CPU {r['cpu_median']:.3f}x, "
                    f"fwd+bwd {r['fwd_bwd_median']:.3f}x, fastest/fastest {r['of_minima']:.3f}x "
                    f"(rounds {r['wall_min']:.2f}-{r['wall_max']:.2f})"
                )
            label = "no intervention" if name == "none" else f"`{name}`"
            rows.append((f"step, {label}", value, note))
        r = st["ratio_ours_over_hf_median"]
        for name, label, what in (
            ("hf_none", "HF step, no hooks", "ours-none / HF-none"),
            (
                "hf_zero",
                "HF step, forward hooks `h - (h@Q)@Q.T` on layers 10/15/20",
                "**our CAFT step / HF CAFT step**",
            ),
        ):
            q = r[name.removeprefix("hf_")]
            rows.append(
                (
                    label,
                    f"{v[name]['wall_s_median']:.2f} s (CPU {v[name]['cpu_s_median']:.2f} s)",
                    f"{what} = **{q['wall_median']:.2f}x**; CPU {q['cpu_median']:.2f}x, "
                    f"fwd+bwd {q['fwd_bwd_median']:.2f}x, fastest/fastest {q['of_minima']:.2f}x",
                )
            )
        if "ratio_ours_over_plain_tl_median" in st:
            for key, label in (("none", "no hooks"), ("zero", "zero ablation")):
                name = f"tl_{key}"
                q = st["ratio_ours_over_plain_tl_median"][key]
                h = st["ratio_plain_tl_over_hf_median"][key]
                rows.append(
                    (
                        f"plain TransformerLens step (`caft_tl.fast` off), {label}",
                        f"{v[name]['wall_s_median']:.2f} s (CPU {v[name]['cpu_s_median']:.2f} s)",
                        f"ours/plain TL = **{q['wall_median']:.2f}x** (fwd+bwd "
                        f"{q['fwd_bwd_median']:.2f}x); plain TL/HF = {h['wall_median']:.2f}x",
                    )
                )
    lp = res.get("loss_paths")
    for key, r in lp["ratios"].items() if lp else ():
        kind, iv = key.split("_")
        label = f"{kind} batch, {'zero-ablation' if iv == 'zero' else 'no hooks'}"
        ours = r["ours_over_hflabels"]
        note = (
            f"ours / HF `labels=` = {ours['wall_median']:.2f}x (95% interval "
            f"{_interval(ours)}, CPU time {ours['cpu_median']:.2f}x, fastest steps "
            f"{ours['of_minima']:.2f}x)"
        )
        if "tlloss_over_hflabels" in r:
            value = f"{lp['wall_s_median'][f'tlloss_{key}']:.2f} s (TL loss)"
            note = (
                f'TL `return_type="loss"` / HF `labels=` = '
                f"**{r['tlloss_over_hflabels']['wall_median']:.2f}x**; {note}; ours / HF "
                f"masked = {r['ours_over_hf']['wall_median']:.2f}x"
            )
        else:
            value = f"{lp['wall_s_median'][f'ours_{key}']:.2f} s (ours)"
        rows.append((f"loss paths, {label}", value, note))
    pr = res.get("profile")
    for iv in ("none", "zero") if pr else ():
        t, k = pr[iv]["total_ms"], pr[iv]["kinds_ms"]
        rows.append(
            (
                f"profiled unpadded step, {'zero-ablation' if iv == 'zero' else 'no hooks'}",
                f"{t['ours']:.0f} / {t['hf']:.0f} ms self CPU (ours / HF `labels=`)",
                f"**{t['ours'] / t['hf']:.3f}x**; matrix products {k['ours']['products']:.0f} / "
                f"{k['hf']['products']:.0f} ms, attention {k['ours']['attention']:.0f} / "
                f"{k['hf']['attention']:.0f} ms, the rest {k['ours']['rest']:.0f} / "
                f"{k['hf']['rest']:.0f} ms",
            )
        )
    mem = res.get("memory")
    if mem:
        runs = mem["runs"]
        for name, run in runs.items():
            note = (
                f"first step (allocates AdamW state) / second step; RSS before "
                f"{run['rss_before_mib']:.0f} MiB"
            )
            if "hf_zero" in runs and name != "hf_zero":
                first, second = (
                    run[f"{k}_step_peak_delta_mib"] / runs["hf_zero"][f"{k}_step_peak_delta_mib"]
                    for k in ("first", "second")
                )
                note += f"; over `hf_zero`: **{first:.2f}x** / **{second:.2f}x**"
            rows.append(
                (
                    f"peak RSS growth of a step, `{name}`",
                    f"{run['first_step_peak_delta_mib']:.0f} / "
                    f"{run['second_step_peak_delta_mib']:.0f} MiB",
                    note,
                )
            )
    ck = res.get("checkpoint")
    if ck:
        rows += [
            (
                "checkpoint write (weights + AdamW + RNG, fsynced)",
                f"{ck['save_s_median']:.1f} s",
                f"{ck['checkpoint_mib']:.0f} MiB on disk; median of {len(ck['save_s'])}",
            ),
            (
                "time to first step: fresh / resumed (call to step done)",
                f"{ck['fresh_first_step_s_median']:.1f} / "
                f"{ck['resumed_first_step_s_median']:.1f} s",
                f"resumed/fresh = **{ck['ratio_resumed_over_fresh']:.2f}x**; reading the "
                f"checkpoint {ck['load_s_median']:.1f} s",
            ),
        ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs, ~4 min")
    parser.add_argument(
        "--only",
        choices=["steps", "losspaths", "memory", "checkpoint", "profile"],
        action="append",
        help="a subset (profile runs only when named)",
    )
    parser.add_argument("--output", type=Path, help="JSON result path")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the mode's)")
    parser.add_argument(
        "--target",
        action="store_true",
        help="loss paths: only ours and HF labels= on the unpadded batch (issue 21's target)",
    )
    parser.add_argument("--child", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "memory":
        return child_memory(args.variant)

    set_threads()
    mode = "quick" if args.quick else "full"
    cfg = dict(MODES[mode])
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        cfg["rounds"] = args.rounds
    selected = args.only or ["steps", "losspaths", "checkpoint", "memory"]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": mode,
        "config": cfg,
        "machine": machine_info(),
        "note": "shared, noisy machine: compare ratios within one run, not absolute times",
    }
    if "steps" in selected:
        result["steps"] = bench_steps(cfg)
    if "losspaths" in selected:
        result["loss_paths"] = bench_loss_paths(cfg, target=args.target)
    if "checkpoint" in selected:
        result["checkpoint"] = bench_checkpoint(cfg)
    if "profile" in selected:
        result["profile"] = bench_profile(cfg)
    if "memory" in selected:
        result["memory"] = bench_memory(cfg)
    result["total_wall_s"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg()

    output = args.output or RESULTS_DIR / ("train.json" if mode == "full" else "train_quick.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    result["markdown_table"] = table
    output.write_text(json.dumps(result, indent=2) + "\n")
    load = result["machine"]
    print(f"\nfinished in {result['total_wall_s']:.0f} s; results in {output}")
    print(
        f"NOTE: shared, noisy machine (load average {load['load_average_start'][0]:.1f} at "
        f"start, {load['load_average_end'][0]:.1f} at end on {load['cpu_count']} CPUs); "
        "compare the ratios, which are measured step by step within this run.\n"
    )
    print(table)


if __name__ == "__main__":
    main()
