"""Activation caching and activation diffs of a tiny model, run by tests/test_distributed.py
both under ``torchrun --nproc_per_node=N`` (gloo) and as a single process.

    python tests/ddp_cache.py OUT

Writes OUT/cache (cache_activations), OUT/diff (activation_diff with both sides) and
OUT/memory (the in-memory cache, saved by rank 0 after checking every rank holds it all).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

import caft_tl as ct
from caft_tl import distributed
from caft_tl.models import tiny

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


def texts() -> list[str]:
    words = ["red", "green", "blue", "cold", "warm", "north", "south", "quiet", "loud"]
    # 11 texts of varied length, batches of 2: 6 batches, the last one short.
    return [" ".join(words[(i + j) % len(words)] for j in range(2 + 3 * i % 7)) for i in range(11)]


def main() -> int:
    out = Path(sys.argv[1])
    warnings.simplefilter("ignore", DeprecationWarning)
    torch.set_num_threads(1)
    distributed.setup()
    base, finetuned = tiny(seed=0, n_layers=2), tiny(seed=1, n_layers=2)
    kw = dict(batch_size=2, progress=False, shard_tokens=16)  # several shards per rank
    ct.cache_activations(base, texts(), HOOKS, out=out / "cache", **kw)
    ct.activation_diff(base, finetuned, texts(), HOOKS, out=out / "diff", return_both=True, **kw)
    memory = ct.cache_activations(base, texts(), HOOKS, **kw)
    sizes = distributed.gather_objects((len(memory), memory[HOOKS[0]].sum().item()))
    assert len(set(sizes)) == 1, sizes  # every rank holds every row
    if distributed.is_main():
        memory.save(out / "memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
