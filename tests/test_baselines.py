"""Baseline ConceptSets: random orthonormal directions, top-k by score, random subsets."""

from __future__ import annotations

import json

import pytest
import torch

from caft_tl.directions import ConceptSet, make_provenance
from caft_tl.directions.baselines import random_directions, random_subset, top_k

R0 = "blocks.0.hook_resid_post"
MLP1 = "blocks.1.mlp.hook_post"


@pytest.fixture
def parent() -> ConceptSet:
    g = torch.Generator().manual_seed(0)
    return ConceptSet(
        {
            R0: torch.randn(5, 32, generator=g),
            MLP1: torch.randn(3, 64, generator=g, dtype=torch.float64),
        },
        labels={R0: ["a", "b", "c", "d", "e"], MLP1: ["x", "y", "z"]},
        scores={R0: [0.1, 0.5, 0.3, 0.5, 0.2], MLP1: [2.0, 1.0, 3.0]},
        provenance=make_provenance("pca", model="tiny", k=5),
    )


# ---- random directions -----------------------------------------------------------------------


def test_random_directions_match_shapes_and_are_orthonormal(parent):
    rnd = random_directions(parent, seed=3)
    assert rnd.hooks == parent.hooks
    assert rnd.widths == parent.widths
    for hook in parent.hooks:
        assert rnd[hook].shape == parent[hook].shape
        assert rnd[hook].dtype == parent[hook].dtype
    assert rnd.is_orthonormal()
    d = rnd[MLP1]
    torch.testing.assert_close(d @ d.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert rnd.labels[R0] == [f"random{i}" for i in range(5)]


def test_random_directions_are_seeded(parent):
    a, b = random_directions(parent, seed=1), random_directions(parent, seed=1)
    c = random_directions(parent, seed=2)
    for hook in parent.hooks:
        assert torch.equal(a[hook], b[hook])
        assert not torch.allclose(a[hook], c[hook])
    # A hook's directions do not depend on which other hooks are present.
    alone = random_directions(parent.select({MLP1: [0, 1, 2]}), seed=1)
    assert torch.equal(alone[MLP1], a[MLP1])


def test_random_directions_spread_evenly():
    """Haar-uniform: averaged over many draws, each coordinate gets 1/d of the mass."""
    like = ConceptSet({R0: torch.zeros(1, 8).index_fill_(1, torch.tensor([0]), 1.0)})
    mass = torch.stack([random_directions(like, seed=s)[R0][0] ** 2 for s in range(400)])
    torch.testing.assert_close(mass.mean(0), torch.full((8,), 1 / 8), atol=0.03, rtol=0)


def test_random_directions_provenance(parent):
    prov = random_directions(parent, seed=7).provenance
    assert prov["method"] == prov["baseline"] == "random_directions"
    assert prov["parameters"]["seed"] == 7
    assert prov["parent"] == parent.provenance
    assert prov["model"] == "tiny"
    json.dumps(prov)


def test_random_directions_too_many_for_width():
    with pytest.raises(ValueError, match="do not fit in width 2"):
        random_directions(ConceptSet({R0: torch.randn(3, 2)}))


# ---- top_k -----------------------------------------------------------------------------------


def test_top_k_orders_by_score(parent):
    top = top_k(parent, 3)
    # Ties (0.5, 0.5) keep the original order: "b" before "d".
    assert top.labels[R0] == ["b", "d", "c"]
    assert top.scores[R0] == [0.5, 0.5, 0.3]
    assert top.labels[MLP1] == ["z", "x", "y"]
    assert torch.equal(top[R0], parent[R0][[1, 3, 2]])
    assert top.provenance["parameters"]["indices"] == {R0: [1, 3, 2], MLP1: [2, 0, 1]}
    assert top.provenance["parent"] == parent.provenance
    assert top.provenance["baseline"] == "top_k"


def test_top_k_errors(parent):
    with pytest.raises(ValueError, match="only 3 directions"):
        top_k(parent, 4)
    with pytest.raises(ValueError, match="at least 1"):
        top_k(parent, 0)
    with pytest.raises(ValueError, match="unscored"):
        top_k(ConceptSet({R0: torch.eye(3)}), 1)


# ---- random_subset ---------------------------------------------------------------------------


def test_random_subset(parent):
    sub = random_subset(parent, 2, seed=5)
    again = random_subset(parent, 2, seed=5)
    idx = sub.provenance["parameters"]["indices"]
    for hook in parent.hooks:
        assert len(idx[hook]) == 2 and idx[hook] == sorted(set(idx[hook]))
        assert torch.equal(sub[hook], parent[hook][idx[hook]])
        assert sub.labels[hook] == [parent.labels[hook][i] for i in idx[hook]]
        assert torch.equal(sub[hook], again[hook])
    assert sub.provenance["parent"] == parent.provenance
    assert sub.provenance["parameters"]["seed"] == 5
    # Over seeds, every row gets drawn.
    drawn = set()
    for seed in range(30):
        drawn |= set(random_subset(parent, 1, seed=seed).provenance["parameters"]["indices"][R0])
    assert drawn == set(range(5))


def test_random_subset_errors(parent):
    with pytest.raises(ValueError, match="only 3 directions"):
        random_subset(parent, 4)
    with pytest.raises(TypeError, match="integer"):
        random_subset(parent, 1.5)
