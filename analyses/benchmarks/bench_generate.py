#!/usr/bin/env python
"""Generation benchmark for caft-tl: tokens/s of ``caft_tl.evals.generate`` (the sampler
behind free-form evaluation) against Hugging Face ``generate`` with its key-value cache, on
the embedded SmolLM2-135M-Instruct (CPU, fp32, 2 threads).

    python analyses/benchmarks/bench_generate.py            # full run, ~6 min on 2 idle cores
    python analyses/benchmarks/bench_generate.py --quick    # smoke run, ~2 min

Work: 8 single-turn chat prompts (chat template, generation prompt; 20-40 tokens, so the
batch is left-padded), decoded greedily for exactly ``NEW_TOKENS`` new tokens in one batch
(stop tokens switched off on both sides, so every runner does the same number of decoding
steps). Runners:

* ``ours``: ``caft_tl.evals.generate(model, prompts, SamplingConfig(temperature=0, ...),
  stop=set())`` on the TransformerLens model as ``caft_tl.load_model`` returns it
  (``caft_tl.fast`` on): prefill into a TransformerLens key-value cache, then one token
  per step.
* ``ours_plain``: the same call with ``caft_tl.fast`` switched off (TransformerLens's own
  forward), what caft-tl ran before the fast paths.
* ``hf``: ``hf.generate(input_ids, attention_mask, max_new_tokens=NEW_TOKENS,
  min_new_tokens=NEW_TOKENS, do_sample=False)`` on the same left-padded prompts.

Timing is paired: every round runs each runner once, in a rotated order; the reported
ratio is the median over rounds of ``t_ours / t_hf`` (time per generated token, so < 1 is
faster than HF). A correctness check records, per prompt, how many leading tokens ours and
HF agree on (greedy decoding of the same weights in fp32; a late divergence after a near
tie of two logits is float rounding, not a bug).

Results: ``results/generate.json`` (``generate_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_foundation import THREADS, load_hf, machine_info  # noqa: E402

RESULTS_DIR = HERE / "results"
BATCH = 8
NEW_TOKENS = 64
TARGET_RATIO = 1.2
RUNNERS = ("ours", "ours_plain", "hf")
MODES = {"full": {"rounds": 5}, "quick": {"rounds": 2}}

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "Give me three tips for sleeping better at night.",
    "Explain photosynthesis to a ten-year-old.",
    "What are the main differences between a cat and a dog as pets?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "If you could change one thing about the world, what would it be and why?",
]


def make_prompts(model: Any) -> list[list[int]]:
    from caft_tl.evals.sampling import prompt_tokens

    return [prompt_tokens(model, [{"role": "user", "content": q}]) for q in QUESTIONS[:BATCH]]


def runner_ours(model: Any, prompts: list[list[int]], plain: bool):
    from caft_tl.evals.sampling import SamplingConfig, generate
    from caft_tl.fast import plain_forward

    cfg = SamplingConfig(
        temperature=0.0, max_new_tokens=NEW_TOKENS, batch_size=BATCH, progress=False
    )

    def run() -> list[list[int]]:
        with plain_forward(model) if plain else contextlib.nullcontext():
            gens = generate(model, prompts, cfg, stop=set())
        return [g.tokens for g in gens]

    return run


def runner_hf(hf: Any, prompts: list[list[int]], pad_id: int):
    import torch

    from caft_tl.data import collate

    batch = collate([{"input_ids": p} for p in prompts], pad_token_id=pad_id, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def run() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad_id,
            )
        return out[:, ids.shape[1] :].tolist()

    return run


def _agreement(a: list[list[int]], b: list[list[int]]) -> list[int]:
    """Per row, the number of leading tokens on which ``a`` and ``b`` agree."""
    out = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        out.append(n)
    return out


def bench(cfg: dict[str, Any]) -> dict[str, Any]:
    import caft_tl
    from caft_tl.data import pad_id

    print("[generate] loading the TransformerLens and HF models ...", flush=True)
    model = caft_tl.load_model(device="cpu")
    hf = load_hf()
    prompts = make_prompts(model)
    runs = {
        "ours": runner_ours(model, prompts, plain=False),
        "ours_plain": runner_ours(model, prompts, plain=True),
        "hf": runner_hf(hf, prompts, pad_id(model.tokenizer)),
    }
    print("[generate] warm-up and correctness check ...", flush=True)
    outputs = {name: run() for name, run in runs.items()}
    assert all(len(t) == NEW_TOKENS for out in outputs.values() for t in out), "short output"
    times: dict[str, list[float]] = {n: [] for n in RUNNERS}
    for r in range(cfg["rounds"]):
        shift = r % len(RUNNERS)
        for name in RUNNERS[shift:] + RUNNERS[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
        print(
            f"[generate] round {r + 1}/{cfg['rounds']} (s): "
            + ", ".join(f"{n} {times[n][-1]:.2f}" for n in RUNNERS),
            flush=True,
        )
    n_tokens = BATCH * NEW_TOKENS

    def ratio(num: str, den: str) -> dict[str, float]:
        per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
        return {
            "median": statistics.median(per_round),
            "min": min(per_round),
            "max": max(per_round),
            "of_minima": min(times[num]) / min(times[den]),
        }

    return {
        "batch": BATCH,
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": [len(p) for p in prompts],
        "rounds": cfg["rounds"],
        "seconds": times,
        "tokens_per_s_median": {n: n_tokens / statistics.median(times[n]) for n in RUNNERS},
        "time_ratio_ours_over_hf": ratio("ours", "hf"),
        "time_ratio_ours_plain_over_hf": ratio("ours_plain", "hf"),
        "time_ratio_ours_over_ours_plain": ratio("ours", "ours_plain"),
        "agreement_with_hf": {
            n: _agreement(outputs[n], outputs["hf"]) for n in ("ours", "ours_plain")
        },
        "sample_output": model.tokenizer.decode(outputs["ours"][0]),
    }


def markdown_table(res: dict[str, Any]) -> str:
    tps = res["tokens_per_s_median"]
    shape = f"{res['batch']} prompts x {res['new_tokens']} new tokens, greedy"
    r, p = res["time_ratio_ours_over_hf"], res["time_ratio_ours_plain_over_hf"]
    flag = "" if r["median"] <= TARGET_RATIO else f" (above the {TARGET_RATIO}x target)"
    agree = res["agreement_with_hf"]["ours"]
    rows = [
        ("measurement", "value", "ratio / note"),
        ("---", "---:", "---"),
        ("HF `generate` (KV cache)", f"{tps['hf']:.0f} tok/s", f"reference ({shape})"),
        (
            "`caft_tl.evals.generate` (KV cache, `caft_tl.fast`)",
            f"{tps['ours']:.0f} tok/s",
            f"time ours/HF = **{r['median']:.2f}x**{flag} (rounds {r['min']:.2f}-"
            f"{r['max']:.2f}); leading tokens equal to HF's: {sum(agree)}/"
            f"{res['batch'] * res['new_tokens']}",
        ),
        (
            "same, plain TransformerLens forward",
            f"{tps['ours_plain']:.0f} tok/s",
            f"time plain/HF = {p['median']:.2f}x",
        ),
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--output", type=Path, help="JSON result path")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    mode = "quick" if args.quick else "full"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "mode": mode,
        "config": MODES[mode],
        "machine": machine_info(),
        "note": "shared, noisy machine: compare ratios within one run, not absolute times",
    }
    result["generate"] = bench(MODES[mode])
    result["total_wall_s"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = os.getloadavg()
    table = markdown_table(result["generate"])
    result["markdown_table"] = table
    output = args.output or RESULTS_DIR / (
        "generate.json" if mode == "full" else "generate_quick.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nfinished in {result['total_wall_s']:.0f} s; results in {output}\n")
    print(table)


if __name__ == "__main__":
    main()
