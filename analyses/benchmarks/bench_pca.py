#!/usr/bin/env python
"""Streaming PCA benchmark: throughput and peak memory as the number of tokens grows 10x.

    python analyses/benchmarks/bench_pca.py            # full run: 20k / 200k / 2M tokens, ~5 min
    python analyses/benchmarks/bench_pca.py --quick    # smoke run: 8k / 80k tokens, ~1 min

Random activation differences (d = 576, SmolLM2's residual width, decaying spectrum plus a
mean offset) are written as an on-disk Activations folder per size, by the same shard
writer that ``cache_activations(out=...)`` uses. Each measurement runs in a fresh
subprocess that opens the folder, resets its RSS high-water mark and then runs:

* **ours**: ``caft_tl.directions.pca(folder, k=20)``: one streaming pass over the shards,
  float64 second moments, exact ``eigh``. Timed end to end, shard reads included.
* **reference**: what the reference implementation does: the whole difference matrix in
  memory (float32, preallocated and filled shard by shard, the least memory that approach
  can use), centred in place, then ``torch.svd_lowrank(X, q=k+10)`` (default ``niter=2``).
  Load and SVD are timed separately.

Peak memory is the kernel's RSS high-water mark (``VmHWM``) minus the RSS after opening
the folder (see ``bench_foundation.py`` for why the mark is reset and ``malloc_trim`` is
called first; ``ru_maxrss`` would carry the parent's peak over the fork).
"Top-k variance" is the share of the total variance inside the k-dimensional subspace each
method returns: exact for ours, the randomised approximation's for the reference.

Results go to ``results/pca.json`` (``pca_quick.json`` with ``--quick``); a Markdown
table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from bench_foundation import (  # noqa: E402  (shared helpers of the sibling benchmark)
    THREADS,
    emit,
    malloc_trim,
    reset_peak_rss,
    run_child,
    vm_kib,
)

RESULTS_DIR = HERE / "results"
WIDTH = 576  # SmolLM2-135M d_model
K = 20  # CAFT's number of PCs
HOOK = "blocks.12.hook_resid_post"
EXAMPLE_TOKENS = 64

MODES = {
    "full": {"sizes": [20_000, 200_000, 2_000_000], "shard_tokens": 16_384},
    # N must exceed the shard size, or the small run never fills a shard and the ratio
    # measures the shard buffer instead of growth with N.
    "quick": {"sizes": [8_000, 80_000], "shard_tokens": 2_048},
}


# ============================================================================ helpers


def _peak_kib() -> int:
    # VmHWM, not getrusage's ru_maxrss: a child started by fork + exec inherits the
    # parent's peak in ru_maxrss (the parent here holds torch and generated data), and
    # clear_refs resets VmHWM only.
    return vm_kib("VmHWM")


def _baseline() -> tuple[int, bool]:
    gc.collect()
    malloc_trim()
    rss = vm_kib("VmRSS")
    return rss, reset_peak_rss()


def _mem_available_kib() -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.M).group(1))


# ============================================================================== data


def write_folder(path: Path, n_tokens: int, shard_tokens: int, seed: int = 0) -> None:
    """An Activations folder of ``n_tokens`` random difference rows at HOOK."""
    import torch

    # The writer cache_activations(out=...) uses: the shards are exactly what pca() reads.
    from caft_tl.activations import ShardSink

    g = torch.Generator().manual_seed(seed)
    # A decaying spectrum, like real differences. Axis-aligned: both methods are rotation
    # invariant, and a rotation would cost a 576 x 576 matmul per row just to write data.
    scales = torch.logspace(0.5, -1.5, WIDTH)
    offset = 0.3 * torch.randn(WIDTH, generator=g)
    sink = ShardSink(path, [HOOK], shard_tokens)
    for start in range(0, n_tokens, shard_tokens):
        m = min(shard_tokens, n_tokens - start)
        rows = torch.arange(start, start + m)
        sink.add(
            {
                HOOK: torch.randn(m, WIDTH, generator=g) * scales + offset,
                "_example": rows // EXAMPLE_TOKENS,
                "_position": rows % EXAMPLE_TOKENS,
                "_token": torch.zeros(m, dtype=torch.long),
                "_target": torch.ones(m, dtype=torch.long),
            }
        )
    n_examples = -(-n_tokens // EXAMPLE_TOKENS)
    lengths = [EXAMPLE_TOKENS] * (n_examples - 1) + [n_tokens - EXAMPLE_TOKENS * (n_examples - 1)]
    meta = {"model": "synthetic", "positions": "all", "n_examples": n_examples, "kind": "diff"}
    sink.close([[0] * n for n in lengths], meta)


# ========================================================================== children


def child_ours(folder: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    from caft_tl.activations import Activations
    from caft_tl.directions.pca import pca

    acts = Activations.load(folder)
    rss0, reset = _baseline()
    start = time.perf_counter()
    cs = pca(acts, k=K, progress=False)
    seconds = time.perf_counter() - start
    peak = _peak_kib()
    # The part of the time that does not grow with tokens: one (warm) d x d eigh.
    sym = torch.randn(WIDTH, WIDTH, dtype=torch.float64)
    t0 = time.perf_counter()
    torch.linalg.eigh(sym @ sym.T)
    eigh_s = time.perf_counter() - t0
    emit(
        {
            "n_tokens": len(acts),
            "seconds": seconds,
            "warm_eigh_s": eigh_s,
            "load_average": os.getloadavg(),
            "tokens_per_s": len(acts) / seconds,
            "rss_baseline_mib": rss0 / 1024,
            "peak_delta_mib": (peak - rss0) / 1024,
            "peak_reset_ok": reset,
            "topk_variance": sum(cs.scores[HOOK]),
        }
    )


def child_reference(folder: str) -> None:
    import torch

    torch.set_num_threads(THREADS)
    from caft_tl.activations import Activations

    acts = Activations.load(folder)
    n = len(acts)
    rss0, reset = _baseline()
    start = time.perf_counter()
    x = torch.empty(n, WIDTH)
    row = 0
    for chunk in acts.iter_chunks(HOOK):
        x[row : row + len(chunk)] = chunk
        row += len(chunk)
    loaded = time.perf_counter()
    x -= x.mean(0)  # in place: no second n x d copy
    _, _, v = torch.svd_lowrank(x, q=K + 10)
    done = time.perf_counter()
    peak = _peak_kib()
    top = v[:, :K]
    captured = float((x @ top).square().sum() / x.square().sum())
    emit(
        {
            "n_tokens": n,
            "seconds": done - start,
            "load_s": loaded - start,
            "svd_s": done - loaded,
            "tokens_per_s": n / (done - start),
            "svd_tokens_per_s": n / (done - loaded),
            "rss_baseline_mib": rss0 / 1024,
            "peak_delta_mib": (peak - rss0) / 1024,
            "peak_reset_ok": reset,
            "matrix_mib": n * WIDTH * 4 / 2**20,
            "load_average": os.getloadavg(),
            "topk_variance": captured,
        }
    )


# ============================================================================ report


def machine_info() -> dict[str, Any]:
    import torch

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": THREADS,
        "load_average_start": os.getloadavg(),
    }


def markdown_table(res: dict[str, Any]) -> str:
    rows = [
        ("tokens", "method", "tok/s", "peak RSS growth", "top-20 variance"),
        ("---:", "---", "---:", "---:", "---:"),
    ]
    for size in res["runs"]:
        ours, ref = size["ours"], size.get("reference")
        rows.append(
            (
                f"{size['n_tokens']:,}",
                "ours: streaming `pca` (float64, eigh)",
                f"{ours['tokens_per_s']:,.0f}",
                f"{ours['peak_delta_mib']:.0f} MiB",
                f"{ours['topk_variance']:.4f}",
            )
        )
        if ref is None:
            rows.append((f"{size['n_tokens']:,}", "reference", "skipped", size["skipped"], ""))
            continue
        rows.append(
            (
                f"{size['n_tokens']:,}",
                f"reference: in memory + `svd_lowrank(q={K + 10})`",
                f"{ref['tokens_per_s']:,.0f} ({ref['svd_tokens_per_s']:,.0f} SVD only)",
                f"{ref['peak_delta_mib']:.0f} MiB",
                f"{ref['topk_variance']:.4f}",
            )
        )
    for name, ratio in res["memory_growth"].items():
        rows.append(("", f"peak growth, largest / smallest size: {name}", "", f"{ratio:.2f}x", ""))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8k / 80k tokens, ~1 minute")
    parser.add_argument("--output", type=Path, help="JSON result path")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ours":
        return child_ours(args.folder)
    if args.child == "reference":
        return child_reference(args.folder)

    import torch

    torch.set_num_threads(THREADS)
    mode = "quick" if args.quick else "full"
    cfg = MODES[mode]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": mode,
        "config": {**cfg, "width": WIDTH, "k": K, "q": K + 10, "hook": HOOK},
        "machine": machine_info(),
        "runs": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="caft-bench-pca-"))
    try:
        for n in cfg["sizes"]:
            folder = tmp / f"acts_{n}"
            t0 = time.perf_counter()
            write_folder(folder, n, cfg["shard_tokens"])
            print(f"[pca] {n:,} tokens written in {time.perf_counter() - t0:.0f} s", flush=True)
            run: dict[str, Any] = {"n_tokens": n}
            run["ours"] = run_child(["--child", "ours", "--folder", str(folder)], Path(__file__))
            print(f"[pca] ours: {run['ours']['tokens_per_s']:,.0f} tok/s", flush=True)
            need_kib = 2 * n * WIDTH * 4 // 1024  # matrix + headroom, or we might OOM others
            if need_kib < _mem_available_kib() // 2:
                run["reference"] = run_child(
                    ["--child", "reference", "--folder", str(folder)], Path(__file__)
                )
                print(f"[pca] ref:  {run['reference']['tokens_per_s']:,.0f} tok/s", flush=True)
            else:
                run["skipped"] = f"needs ~{need_kib / 2**20:.1f} GiB"
            result["runs"].append(run)
            shutil.rmtree(folder)  # keep the disk footprint to one size at a time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    first, last = result["runs"][0], result["runs"][-1]
    growth = {"ours": last["ours"]["peak_delta_mib"] / first["ours"]["peak_delta_mib"]}
    with_ref = [r for r in result["runs"] if "reference" in r]
    if len(with_ref) >= 2:
        small, big = with_ref[0]["reference"], with_ref[-1]["reference"]
        growth["reference"] = big["peak_delta_mib"] / small["peak_delta_mib"]
    result["memory_growth"] = growth
    result["total_wall_s"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg()
    output = args.output or RESULTS_DIR / ("pca.json" if mode == "full" else "pca_quick.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    result["markdown_table"] = table
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfinished in {result['total_wall_s']:.0f} s; results in {output}\n")
    print(table)


if __name__ == "__main__":
    main()
