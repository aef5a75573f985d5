"""Numbers over seeds: means, bootstrap intervals and paired differences against a baseline.

A study runs every method with the same seeds (same data order, same initial model), so
method and baseline are compared seed by seed: the paired difference ``method - baseline``
per seed, its mean, and a percentile bootstrap interval that resamples seeds. With five
seeds such an interval is coarse (it can only take values built from five numbers); it
says whether the sign is consistent across seeds, not much more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["bootstrap_ci", "seed_comparison"]


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs when fewer than 2)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or np.isnan(x).any():
        raise ValueError("values must be a flat sequence of numbers without NaN")
    if len(x) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def seed_comparison(
    evals: Mapping[str, Mapping[str, Any]],
    *,
    baseline: str = "plain",
    split: str = "ood",
    metric: str = "accuracy",
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per method: per-seed values, mean and bootstrap interval, and the paired
    difference against ``baseline`` (mean and interval over the seeds both have).

    ``evals`` maps ``"method/seed"`` (or a bare ``"method"`` for a single unseeded run, such
    as the base model) to ``{split: {metric: value, ...}}``, as the demo's results hold
    them. Methods without ``baseline``'s seeds get no difference (NaN).
    """
    per: dict[str, dict[str, float]] = {}
    for name, result in evals.items():
        method, _, seed = name.partition("/")
        if split in result:
            per.setdefault(method, {})[seed] = float(result[split][metric])
    if baseline not in per:
        raise ValueError(f"no {baseline!r} runs among {sorted(per)}")
    rows = []
    for method, values in per.items():
        seeds = sorted(values)
        common = [s for s in seeds if s in per[baseline] and s]
        diffs = [values[s] - per[baseline][s] for s in common]
        mean = float(np.mean(list(values.values())))
        rows.append(
            {
                "method": method,
                "split": split,
                "seeds": seeds,
                "values": [values[s] for s in seeds],
                "mean": mean,
                "ci": bootstrap_ci([values[s] for s in seeds], level=level),
                "diff_seeds": common,
                "diffs": diffs,
                "diff_mean": float(np.mean(diffs)) if diffs else math.nan,
                "diff_ci": bootstrap_ci(diffs, level=level) if diffs else (math.nan, math.nan),
            }
        )
    return pd.DataFrame(rows)
