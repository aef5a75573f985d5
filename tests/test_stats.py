"""Numbers over seeds: bootstrap intervals and paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caft_tl.evals import bootstrap_ci, seed_comparison


def test_bootstrap_interval_brackets_the_mean_and_is_repeatable():
    values = [0.1, 0.4, 0.2, 0.5, 0.3]
    low, high = bootstrap_ci(values)
    assert min(values) <= low < np.mean(values) < high <= max(values)
    assert bootstrap_ci(values) == (low, high)  # seeded
    wide = bootstrap_ci(values, level=0.99)
    assert wide[0] <= low and wide[1] >= high
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))
    assert all(math.isnan(x) for x in bootstrap_ci([0.5]))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(values, level=1.5)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, float("nan")])


def test_seed_comparison_pairs_by_seed():
    evals = {"base": {"ood": {"accuracy": 0.5}}}
    plain = [0.1, 0.0, 0.2]
    caft = [0.5, 0.6, 0.4]
    for seed, (p, c) in enumerate(zip(plain, caft, strict=True)):
        evals[f"plain/s{seed}"] = {"ood": {"accuracy": p}, "test": {"accuracy": 1.0}}
        evals[f"caft/s{seed}"] = {"ood": {"accuracy": c}, "test": {"accuracy": 0.9}}
    evals["caft/s3"] = {"ood": {"accuracy": 0.9}}  # no plain partner: not in the difference
    df = seed_comparison(evals).set_index("method")
    assert df.loc["caft", "diffs"] == pytest.approx([0.4, 0.6, 0.2])
    assert df.loc["caft", "diff_mean"] == pytest.approx(0.4)
    assert df.loc["caft", "mean"] == pytest.approx(np.mean(caft + [0.9]))
    low, high = df.loc["caft", "diff_ci"]
    assert 0.2 <= low < 0.4 < high <= 0.6
    assert df.loc["plain", "diff_mean"] == 0.0
    assert math.isnan(df.loc["base", "diff_mean"])  # unseeded: nothing to pair with
    ids = seed_comparison(evals, split="test").set_index("method")
    assert ids.loc["caft", "diff_mean"] == pytest.approx(-0.1)
    with pytest.raises(ValueError, match="no 'none' runs"):
        seed_comparison(evals, baseline="none")
