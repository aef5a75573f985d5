#!/usr/bin/env python
"""Foundation benchmarks for caft-tl: caching throughput, model load time, caching memory.

    python analyses/benchmarks/bench_foundation.py            # full run, ~10-15 min
    python analyses/benchmarks/bench_foundation.py --quick    # smoke run, ~3 min

1. Throughput: ``cache_activations`` at ``blocks.15.hook_resid_post`` (middle of 30 layers;
   it stops after layer 15) against a bare Hugging Face forward of the whole model on the
   same tokenised batches. The data set is split into chunks; each chunk is timed with
   both (and in full mode with a whole-model control hook), in alternating order, so every
   ratio compares two measurements taken seconds apart on a shared, noisy machine.
2. Load time: ``caft_tl.load_model()`` in a fresh subprocess with an empty
   ``CAFT_TL_CACHE`` (GGUF de-quantisation + conversion) and again with the filled cache.
3. Memory: peak RSS growth while caching N and 10N tokens, streamed to disk (``out=``) and
   in memory, each in a fresh subprocess; the high-water mark is reset after the model is
   loaded so the load's own peak does not hide the caching peak.

Results go to ``analyses/benchmarks/results/foundation.json`` (``foundation_quick.json``
with ``--quick``); a Markdown table is printed at the end. See README.md next to this file.
Module-level imports are kept light on purpose: child processes time their own imports.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS_DIR = HERE / "results"
# Every table was measured on 2 threads; OMP_NUM_THREADS, where set, says fewer or more (the
# parallel test suite gives each worker its share of the cores).
THREADS = int(os.environ.get("OMP_NUM_THREADS") or 2)
BATCH_SIZE = 8
MAX_LENGTH = 64
HOOK = "blocks.15.hook_resid_post"
# Control for the throughput ratio: a hook after the last block makes cache_activations run
# the whole model including the unembedding, i.e. the same work as the HF forward.
CONTROL_HOOK = "ln_final.hook_normalized"
# Memory runs cache the first block's residual stream: every resid hook stores d_model floats
# per token, so the sink's memory behaviour is the same as at the middle layer, while 10N
# tokens through 16 layers would take 5-30 minutes on 2 shared cores.
MEMORY_HOOK = "blocks.0.hook_resid_post"
RESULT_MARKER = "BENCH_RESULT "

MODES = {
    "full": {
        "n_texts": 256,  # 32 batches of 8, ~59 tokens each
        "chunk_batches": 4,  # 8 paired chunks
        "control": True,
        "load_reps": 2,
        "mem_tokens": 20_000,
        "mem_hook": MEMORY_HOOK,
        "shard_tokens": 16_384,  # the library default
    },
    "quick": {
        "n_texts": 48,
        "chunk_batches": 2,
        "control": False,
        "load_reps": 1,
        "mem_tokens": 2_000,
        "mem_hook": MEMORY_HOOK,
        # N must exceed the shard size, or the small run never fills a shard and the
        # comparison measures the shard buffer, not whether memory grows with N.
        "shard_tokens": 1_024,
    },
}


# =============================================================================== data

_SUBJECTS = [
    "The old fisherman",
    "A young engineer",
    "My neighbour",
    "The city council",
    "Our chemistry teacher",
    "The tired nurse",
    "A curious child",
    "The night-shift pilot",
    "Her grandmother",
    "The small startup",
    "A stray cat",
    "The museum curator",
    "The football coach",
    "Two students from Lisbon",
    "The baker on the corner",
    "A retired judge",
    "The new intern",
    "The orchestra",
    "A travelling salesman",
    "The village doctor",
    "My younger brother",
    "The research team",
    "A quiet librarian",
]
_PREDICATES = [
    "repaired the broken fence",
    "wrote a long letter to the editor",
    "planted tomatoes and basil in the garden",
    "forgot the keys on the kitchen table",
    "explained the budget to a sceptical audience",
    "painted the hallway a pale green",
    "read three chapters of a mystery novel",
    "argued about the price of fresh bread",
    "counted the boats returning to the harbour",
    "cancelled the meeting without warning",
    "measured the rainfall every morning",
    "sold the last umbrella in the shop",
    "translated an old recipe from Italian",
    "practised the violin for two hours",
    "found a fossil in the limestone cliff",
    "baked a lemon cake for the neighbours",
    "fixed the leaking tap with a rubber band",
    "lost the match by a single point",
    "answered every question with patience",
    "drew a map of the forgotten railway",
]
_PLACES = [
    "near the harbour",
    "in the public library",
    "behind the train station",
    "at the edge of the forest",
    "on the crowded bus",
    "in a tiny flat above the bakery",
    "during the street festival",
    "at the top of the hill",
    "in the hospital canteen",
    "beside the frozen lake",
    "in the back room of the café",
    "on the rooftop terrace",
]
_TIMES = [
    "Yesterday",
    "Last winter",
    "Every Sunday",
    "Before sunrise",
    "After the storm",
    "On Tuesday evening",
    "Twenty years ago",
    "During the long summer holiday",
    "Just before midnight",
    "Early in the morning",
    "Later that week",
    "Once a month",
]
_REASONS = [
    "because the rain had finally stopped",
    "although nobody had asked",
    "so that the children could play outside",
    "while the radio played old jazz",
    "since the shops were already closed",
    "even though the weather was terrible",
    "to the surprise of everyone present",
    "after a long and difficult week",
]
_TOPICS = [
    "photosynthesis",
    "compound interest",
    "the water cycle",
    "how vaccines work",
    "the French Revolution",
    "black holes",
    "sourdough starters",
    "binary search",
    "plate tectonics",
    "the causes of inflation",
    "how bees communicate",
    "the rules of chess",
    "climate and weather",
    "electric cars",
    "sleep and memory",
]
_TASKS = [
    "keep basil alive indoors",
    "prepare for a job interview",
    "learn a new language",
    "write a polite complaint",
    "save money on groceries",
    "start running again",
    "organise a small wedding",
    "clean a cast-iron pan",
    "teach a child to swim",
    "choose a second-hand bicycle",
    "study for a maths exam",
    "fall asleep faster",
]
_QUESTIONS = [
    "Can you explain {topic} in simple terms?",
    "How do I {task}?",
    "What is the best way to {task}?",
    "Write two sentences about {topic}.",
    "Why do people find {topic} confusing?",
    "Give me a quick tip: how can I {task}?",
]
_ANSWER_OPENERS = [
    "Sure, here is a short explanation.",
    "Good question.",
    "Here is a simple way to think about it.",
    "Happy to help.",
    "In short, it depends on a few things.",
]
_SYSTEMS = [
    None,
    None,
    "You are a concise assistant.",
    "You are a friendly tutor for teenagers.",
    "Answer briefly and avoid jargon.",
]


def _lower(subject: str) -> str:
    return subject[0].lower() + subject[1:]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    subject, predicate = rng.choice(_SUBJECTS), rng.choice(_PREDICATES)
    if kind < 0.35:
        return f"{rng.choice(_TIMES)}, {_lower(subject)} {predicate} {rng.choice(_PLACES)}."
    if kind < 0.7:
        return f"{subject} {predicate} {rng.choice(_REASONS)}."
    if kind < 0.85:
        return (
            f"{subject} {predicate}, and {_lower(rng.choice(_SUBJECTS))} {rng.choice(_PREDICATES)}."
        )
    return f"Did {_lower(subject)} really {predicate.split(' ', 1)[1]} {rng.choice(_PLACES)}?"


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` plain English paragraphs of 2-5 generated sentences (about 30-90 tokens)."""
    rng = random.Random(seed)
    return [" ".join(_sentence(rng) for _ in range(rng.randint(2, 5))) for _ in range(n)]


def make_chats(n: int, seed: int = 1) -> list[list[dict[str, str]]]:
    """``n`` generated single-turn conversations, some with a system prompt."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        question = rng.choice(_QUESTIONS).format(topic=rng.choice(_TOPICS), task=rng.choice(_TASKS))
        answer = " ".join(
            [rng.choice(_ANSWER_OPENERS)] + [_sentence(rng) for _ in range(rng.randint(1, 3))]
        )
        system = rng.choice(_SYSTEMS)
        chat = [{"role": "system", "content": system}] if system else []
        chats.append(
            [*chat, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        )
    return chats


def build_dataset(tokenizer: Any, n: int, seed: int = 0):
    """Tokenised mix of texts and chats (alternating), truncated to ``MAX_LENGTH`` tokens."""
    from datasets import concatenate_datasets, disable_progress_bars

    from caft_tl.data import DataWarning, tokenize

    disable_progress_bars()
    n_chats = n // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # truncation to MAX_LENGTH is intended
        texts = tokenize(make_texts(n - n_chats, seed), tokenizer, max_length=MAX_LENGTH)
        chats = tokenize(make_chats(n_chats, seed + 1), tokenizer, max_length=MAX_LENGTH)
    both = concatenate_datasets([texts, chats])
    # Alternate text/chat so every chunk and batch holds both kinds.
    pairs = zip(range(len(texts)), range(len(texts), len(both)), strict=False)
    order = [i for pair in pairs for i in pair]
    taken = set(order)
    order += [i for i in range(len(both)) if i not in taken]
    return both.select(order).flatten_indices()


def dataset_with_tokens(tokenizer: Any, n_tokens: int, seed: int = 0):
    """The shortest prefix of a generated data set holding at least ``n_tokens`` tokens."""
    n = n_tokens // 45 + 16
    while True:
        ds = build_dataset(tokenizer, n, seed)
        total, k = 0, 0
        for k, length in enumerate(ds["n_tokens"], 1):
            total += length
            if total >= n_tokens:
                return ds.select(range(k)).flatten_indices()
        n *= 2


# =============================================================================== helpers


def _set_threads() -> None:
    import torch

    torch.set_num_threads(THREADS)


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM, ...) in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)\s+kB", status, re.M).group(1))


def _maxrss_kib() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark ``VmHWM`` (Linux >= 4.0).

    ``ru_maxrss`` cannot be reset: the kernel also folds into it the peak of the memory map
    the process had before ``exec``, i.e. the parent's peak RSS at the time of the
    ``(v)fork``. A parent holding two models makes every child report that peak, so the
    children read ``VmHWM`` (what ``ru_maxrss`` reports when no parent interferes).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return vm_kib("VmHWM") <= vm_kib("VmRSS") + 1024


def malloc_trim() -> bool:
    """Give freed heap pages back to the OS (glibc only).

    Loading frees a checkpoint's worth of tensors; glibc keeps much of that heap mapped, and
    later allocations would reuse it without raising RSS, hiding real growth.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def emit(result: dict[str, Any]) -> None:
    """Print a child's result on one marked line, for the parent to parse."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_child(
    args: list[str], script: Path | None = None, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a benchmark script (this one by default) as a child, offline, with ``env_extra``
    added to its environment; return its :func:`emit` result plus the total wall time."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env_extra or {}),
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str((script or Path(__file__)).resolve()), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"child {args} failed with exit code {proc.returncode}")
    result = json.loads(lines[-1][len(RESULT_MARKER) :])
    result["subprocess_wall_s"] = wall
    return result


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# =============================================================================== children


def child_load() -> None:
    """Time ``load_model()`` with whatever ``CAFT_TL_CACHE`` the parent set."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(THREADS)
    import caft_tl
    from caft_tl.models import CHECKPOINT_MARKER, embedded_cache_path

    t1 = time.perf_counter()
    cached_before = (embedded_cache_path() / CHECKPOINT_MARKER).exists()
    model = caft_tl.load_model(device="cpu")
    t2 = time.perf_counter()
    emit(
        {
            "import_s": t1 - t0,
            "load_s": t2 - t1,
            "cache_was_filled": cached_before,
            "n_params": sum(p.numel() for p in model.parameters()),
            "rss_mib": vm_kib("VmRSS") / 1024,
        }
    )


def child_memory(n_tokens: int, where: str, hook: str, shard_tokens: int) -> None:
    """Peak RSS growth of one ``cache_activations`` call after the model is loaded."""
    _set_threads()
    import caft_tl

    ds = dataset_with_tokens(caft_tl.load_tokenizer(), n_tokens)
    model = caft_tl.load_model(device="cpu")
    gc.collect()
    rss_untrimmed = vm_kib("VmRSS")
    trimmed = malloc_trim()
    rss_loaded = vm_kib("VmRSS")
    peak_during_load = vm_kib("VmHWM")
    reset = reset_peak_rss()
    tmp = Path(tempfile.mkdtemp(prefix="caft-bench-acts-"))
    try:
        start = time.perf_counter()
        acts = caft_tl.cache_activations(
            model,
            ds,
            hook,
            batch_size=BATCH_SIZE,
            shard_tokens=shard_tokens,
            out=tmp / "acts" if where == "disk" else None,
            progress=False,
        )
        seconds = time.perf_counter() - start
        peak = vm_kib("VmHWM")
        ru_maxrss = _maxrss_kib()
        rss_after = vm_kib("VmRSS")
        n_shards = len(acts.meta.get("shards", [])) if where == "disk" else acts.n_chunks
        disk_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        width = model.cfg.d_model
        emit(
            {
                "where": where,
                "hook": hook,
                "n_tokens": len(acts),
                "n_examples": len(ds),
                "shard_tokens": shard_tokens,
                "n_chunks_or_shards": n_shards,
                "seconds": seconds,
                "rss_loaded_mib": rss_loaded / 1024,
                "peak_rss_mib": peak / 1024,
                "peak_delta_mib": (peak - rss_loaded) / 1024,
                "rss_after_mib": rss_after / 1024,
                "peak_during_load_mib": peak_during_load / 1024,
                "ru_maxrss_mib": ru_maxrss / 1024,
                "rss_before_malloc_trim_mib": rss_untrimmed / 1024,
                "malloc_trim_ok": trimmed,
                "peak_reset_ok": reset,
                "activation_mib": len(acts) * width * 4 / 2**20,
                "disk_mib": disk_bytes / 2**20,
            }
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# =============================================================================== benchmarks


def load_hf():
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from caft_tl.models import embedded_gguf_path

    hf_logging.disable_progress_bar()
    gguf = embedded_gguf_path()
    # transformers' GGUF reader draws its own tqdm bar, which no switch turns off.
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        hf = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    return hf.eval()


def bench_throughput(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    import caft_tl
    from caft_tl.data import batches

    print("[throughput] loading the TransformerLens model and the HF model ...", flush=True)
    t = time.perf_counter()
    model = caft_tl.load_model(device="cpu")
    tl_load = time.perf_counter() - t
    t = time.perf_counter()
    hf = load_hf()
    hf_load = time.perf_counter() - t
    pad = model.tokenizer.pad_token_id
    ds = build_dataset(model.tokenizer, cfg["n_texts"])
    per_chunk = cfg["chunk_batches"] * BATCH_SIZE
    chunks = []
    for a in range(0, len(ds), per_chunk):
        sub = ds.select(range(a, min(a + per_chunk, len(ds)))).flatten_indices()
        hf_batches = list(batches(sub, BATCH_SIZE, pad_token_id=pad, padding_side="right"))
        n_real = sum(int(b["attention_mask"].sum()) for b in hf_batches)
        n_padded = sum(b["input_ids"].numel() for b in hf_batches)
        chunks.append((sub, hf_batches, n_real, n_padded))

    def ours(sub, _hf_batches, n_real, hook=HOOK):
        acts = caft_tl.cache_activations(model, sub, hook, batch_size=BATCH_SIZE, progress=False)
        assert len(acts) == n_real, (len(acts), n_real)

    def bare_hf(_sub, hf_batches, _n_real):
        with torch.inference_mode():
            for b in hf_batches:
                hf(b["input_ids"], attention_mask=b["attention_mask"])

    def control(sub, hf_batches, n_real):
        ours(sub, hf_batches, n_real, hook=CONTROL_HOOK)

    runners = {"ours": ours, "hf": bare_hf}
    if cfg["control"]:
        runners["control"] = control
    # Warm-up (first-call allocations, kernel selection) on one batch each.
    first = chunks[0][0].select(range(BATCH_SIZE))
    first_b = list(batches(first, BATCH_SIZE, pad_token_id=pad, padding_side="right"))
    for fn in runners.values():
        fn(first, first_b, sum(int(b["attention_mask"].sum()) for b in first_b))

    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for i, chunk in enumerate(tqdm(chunks, desc="throughput (paired chunks)")):
        shift = i % len(names)  # rotate the order: nobody always goes first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name](*chunk[:3])
            times[name].append(time.perf_counter() - start)

    real = [c[2] for c in chunks]
    padded = [c[3] for c in chunks]
    out: dict[str, Any] = {
        "hook": HOOK,
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "n_examples": len(ds),
        "n_chunks": len(chunks),
        "examples_per_chunk": per_chunk,
        "tokens_real": sum(real),
        "tokens_padded": sum(padded),
        "mean_example_tokens": sum(real) / len(ds),
        "tl_model_load_s": tl_load,
        "hf_model_load_s": hf_load,
        "per_chunk_seconds": times,
    }
    for name in names:
        tps = [n / s for n, s in zip(real, times[name], strict=True)]
        out[f"{name}_tokens_per_s_median"] = _median(tps)
        out[f"{name}_tokens_per_s_overall"] = sum(real) / sum(times[name])
    # Paired ratios: chunk i's HF time over chunk i's time of the other runner (> 1: faster).
    ratios = {k: [h / t for h, t in zip(times["hf"], times[k], strict=True)] for k in names}
    out["ratio_ours_over_hf_median"] = _median(ratios["ours"])
    out["ratio_ours_over_hf_min"] = min(ratios["ours"])
    out["ratio_ours_over_hf_max"] = max(ratios["ours"])
    out["ratio_ours_over_hf_overall"] = sum(times["hf"]) / sum(times["ours"])
    if "control" in times:
        out["control_hook"] = CONTROL_HOOK
        out["ratio_control_over_hf_median"] = _median(ratios["control"])
    del model, hf
    gc.collect()
    return out


def bench_load(cfg: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "cached": []}
    for rep in range(cfg["load_reps"]):
        cache = Path(tempfile.mkdtemp(prefix="caft-bench-cache-"))
        try:
            for kind in ("cold", "cached"):
                print(
                    f"[load] {kind} load, repetition {rep + 1}/{cfg['load_reps']} ...", flush=True
                )
                result = run_child(["--child", "load"], env_extra={"CAFT_TL_CACHE": str(cache)})
                expected = kind == "cached"
                if result["cache_was_filled"] != expected:
                    raise RuntimeError(f"{kind} load found cache_was_filled={not expected}")
                runs[kind].append(result)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    out: dict[str, Any] = {"repetitions": cfg["load_reps"], "runs": runs}
    for kind in runs:
        for field in ("load_s", "import_s", "subprocess_wall_s"):
            out[f"{kind}_{field}_median"] = _median([r[field] for r in runs[kind]])
    out["ratio_cold_over_cached_load"] = out["cold_load_s_median"] / out["cached_load_s_median"]
    out["ratio_cold_over_cached_subprocess"] = (
        out["cold_subprocess_wall_s_median"] / out["cached_subprocess_wall_s_median"]
    )
    return out


def bench_memory(cfg: dict[str, Any]) -> dict[str, Any]:
    n = cfg["mem_tokens"]
    runs = {}
    # Alternate disk and memory runs; each is a fresh process.
    for size, tokens in (("N", n), ("10N", 10 * n)):
        for where in ("disk", "memory"):
            print(f"[memory] {where}, {tokens} tokens ...", flush=True)
            runs[f"{where}_{size}"] = run_child(
                [
                    "--child",
                    "memory",
                    "--tokens",
                    str(tokens),
                    "--where",
                    where,
                    "--hook",
                    cfg["mem_hook"],
                    "--shard-tokens",
                    str(cfg["shard_tokens"]),
                ]
            )
    out: dict[str, Any] = {
        "N_tokens": n,
        "hook": cfg["mem_hook"],
        "shard_tokens": cfg["shard_tokens"],
        "runs": runs,
    }
    for where in ("disk", "memory"):
        small, big = runs[f"{where}_N"]["peak_delta_mib"], runs[f"{where}_10N"]["peak_delta_mib"]
        out[f"ratio_{where}_10N_over_N"] = big / small if small > 0 else float("nan")
    return out


# =============================================================================== report


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": version("transformers"),
        "transformer_lens": version("transformer-lens"),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def markdown_table(res: dict[str, Any]) -> str:
    rows = [("measurement", "value", "ratio / note"), ("---", "---:", "---")]
    tp, ld, mem = res.get("throughput"), res.get("load"), res.get("memory")
    if tp:
        rows += [
            (
                f"`cache_activations` at `{tp['hook']}` (batch {tp['batch_size']}, "
                f"~{tp['mean_example_tokens']:.0f} tok/example)",
                f"{tp['ours_tokens_per_s_median']:.0f} tok/s",
                f"ours/HF = **{tp['ratio_ours_over_hf_median']:.2f}x** (median of "
                f"{tp['n_chunks']} paired chunks; range {tp['ratio_ours_over_hf_min']:.2f}-"
                f"{tp['ratio_ours_over_hf_max']:.2f})",
            ),
            (
                "bare HF forward, whole model (same batches)",
                f"{tp['hf_tokens_per_s_median']:.0f} tok/s",
                "reference",
            ),
        ]
        if "control_tokens_per_s_median" in tp:
            rows.append(
                (
                    f"control: `cache_activations` at `{tp['control_hook']}` (whole model)",
                    f"{tp['control_tokens_per_s_median']:.0f} tok/s",
                    f"control/HF = {tp['ratio_control_over_hf_median']:.2f}x "
                    "(TransformerLens + caching at equal work)",
                )
            )
    if ld:
        reps = ld["repetitions"]
        rows += [
            (
                "`load_model()` cold (empty cache: GGUF de-quantise + convert)",
                f"{ld['cold_load_s_median']:.1f} s",
                f"cold/cached = **{ld['ratio_cold_over_cached_load']:.1f}x** (median of {reps})",
            ),
            (
                "`load_model()` cached",
                f"{ld['cached_load_s_median']:.1f} s",
                f"imports add {ld['cached_import_s_median']:.1f} s",
            ),
            (
                "whole subprocess, cold / cached",
                f"{ld['cold_subprocess_wall_s_median']:.1f} s / "
                f"{ld['cached_subprocess_wall_s_median']:.1f} s",
                f"{ld['ratio_cold_over_cached_subprocess']:.1f}x",
            ),
        ]
    if mem:
        r = mem["runs"]
        for where, label in (("disk", "streamed to disk (`out=`)"), ("memory", "in memory")):
            small, big = r[f"{where}_N"], r[f"{where}_10N"]
            note = (
                f"10N/N = **{mem[f'ratio_{where}_10N_over_N']:.2f}x**; activations "
                f"{small['activation_mib']:.0f} / {big['activation_mib']:.0f} MiB"
            )
            if where == "disk":
                note += f"; shards of {mem['shard_tokens']} rows"
            rows.append(
                (
                    f"peak RSS growth, {label}, N={small['n_tokens']} / 10N={big['n_tokens']} tok",
                    f"{small['peak_delta_mib']:.0f} / {big['peak_delta_mib']:.0f} MiB",
                    note,
                )
            )
        if not all(run["peak_reset_ok"] for run in r.values()):
            rows.append(("WARNING", "-", "peak reset failed: rows above include the load peak"))
        rows.append(
            (
                "RSS after model load (baseline of the rows above)",
                f"{r['disk_N']['rss_loaded_mib']:.0f} MiB",
                f"hook `{mem['hook']}`; the load itself peaked at "
                f"{r['disk_N']['peak_during_load_mib']:.0f} MiB",
            )
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~3 minutes")
    parser.add_argument(
        "--only",
        choices=["throughput", "load", "memory"],
        action="append",
        help="run only these benchmarks (repeatable)",
    )
    parser.add_argument("--output", type=Path, help="JSON result path")
    # Internal: the subprocesses this script starts.
    parser.add_argument("--child", choices=["load", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--where", choices=["disk", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--hook", help=argparse.SUPPRESS)
    parser.add_argument("--shard-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "load":
        return child_load()
    if args.child == "memory":
        return child_memory(args.tokens, args.where, args.hook, args.shard_tokens)

    _set_threads()
    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    selected = args.only or ["throughput", "load", "memory"]
    started = time.perf_counter()
    result: dict[str, Any] = {"mode": mode, "config": cfg, "machine": machine_info()}
    if "throughput" in selected:
        result["throughput"] = bench_throughput(cfg)
    if "load" in selected:
        result["load"] = bench_load(cfg)
    if "memory" in selected:
        result["memory"] = bench_memory(cfg)
    result["total_wall_s"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    output = args.output or RESULTS_DIR / (
        "foundation.json" if mode == "full" else "foundation_quick.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    result["markdown_table"] = table
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfinished in {result['total_wall_s']:.0f} s; results in {output}\n")
    print(table)


if __name__ == "__main__":
    main()
