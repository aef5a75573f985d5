"""ConceptSet: construction checks, selection, union, QR, validation against a model, saving."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from caft_tl.directions import ConceptSet, make_provenance
from caft_tl.directions import concepts as concepts_module
from caft_tl.directions.concepts import data_fingerprint

R0 = "blocks.0.hook_resid_post"
MLP1 = "blocks.1.mlp.hook_post"


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, seed=0,
    )  # fmt: skip
    return HookedTransformer(cfg)


def _random_set(seed: int = 0, dtype: torch.dtype = torch.float64) -> ConceptSet:
    g = torch.Generator().manual_seed(seed)
    return ConceptSet(
        {
            R0: torch.randn(3, 32, generator=g, dtype=dtype),
            MLP1: torch.randn(2, 64, generator=g, dtype=dtype),
        },
        labels={R0: ["a", "b", "c"]},
        scores={R0: [0.5, 0.25, 0.125], MLP1: [1.0, 2.0]},
        provenance=make_provenance("test", model="tiny", data=[1, 2, 3], k=3),
    )


def _assert_same(a: ConceptSet, b: ConceptSet) -> None:
    assert a.hooks == b.hooks
    for hook in a.hooks:
        assert a[hook].dtype == b[hook].dtype
        assert torch.equal(a[hook], b[hook])
        assert a.labels[hook] == b.labels[hook]
        assert [str(x) for x in a.scores[hook]] == [str(x) for x in b.scores[hook]]  # NaN-safe
    assert a.provenance == b.provenance


# ---- construction ----------------------------------------------------------------------------


def test_basic_views_and_defaults():
    cs = ConceptSet({R0: torch.randn(3, 32), MLP1: [torch.randn(64), torch.randn(64)]})
    assert cs.hooks == [R0, MLP1]
    assert cs.n_directions == len(cs) == 5
    assert cs.widths == {R0: 32, MLP1: 64}
    assert cs[MLP1].shape == (2, 64)  # list of vectors stacked
    assert cs.labels[R0] == ["0", "1", "2"]
    assert all(math.isnan(s) for s in cs.scores[R0])
    assert "date" in cs.provenance
    assert R0 in repr(cs) and "5 directions" in repr(cs)


@pytest.mark.parametrize(
    ("directions", "kwargs", "match"),
    [
        ({R0: torch.randn(32)}, {}, "2-D"),
        ({R0: torch.randn(2, 3, 4)}, {}, "2-D"),
        ({R0: torch.randn(0, 32)}, {}, "empty"),
        ({R0: torch.tensor([[1.0, math.nan]])}, {}, "NaN"),
        ({R0: [torch.randn(4), torch.randn(5)]}, {}, "same width"),
        ({R0: torch.randn(2, 4)}, {"labels": {R0: ["x"]}}, "1 labels for 2"),
        ({R0: torch.randn(2, 4)}, {"scores": {R0: [1.0, 2.0, 3.0]}}, "3 scores for 2"),
        ({R0: torch.randn(2, 4)}, {"labels": {MLP1: ["x"]}}, "no directions"),
        ({R0: torch.randn(2, 4)}, {"provenance": {"when": object()}}, "JSON"),
        ({}, {}, "at least"),
    ],
)
def test_constructor_rejects_bad_input(directions, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConceptSet(directions, **kwargs)


def test_constructor_rejects_integer_directions():
    with pytest.raises(TypeError, match="floating"):
        ConceptSet({R0: torch.ones(2, 4, dtype=torch.long)})


# ---- select / union --------------------------------------------------------------------------


def test_select_keeps_rows_labels_scores():
    cs = _random_set()
    sub = cs.select({R0: [2, 0]})
    assert sub.hooks == [R0]
    assert torch.equal(sub[R0], cs[R0][[2, 0]])
    assert sub.labels[R0] == ["c", "a"]
    assert sub.scores[R0] == [0.125, 0.5]
    assert sub.provenance["method"] == "test"
    assert sub.provenance["history"][-1] == {"op": "select", "selection": {R0: [2, 0]}}


def test_select_errors_name_the_problem():
    cs = _random_set()
    with pytest.raises(
        ValueError, match="hook_resid_pots.*Close matches: blocks.0.hook_resid_post"
    ):
        cs.select({"blocks.0.hook_resid_pots": [0]})
    with pytest.raises(IndexError, match=r"has 3 directions.*\[3\]"):
        cs.select({R0: [0, 3]})
    with pytest.raises(IndexError, match="out of range"):
        cs.select({R0: [-1]})
    with pytest.raises(ValueError, match="repeated"):
        cs.select({R0: [1, 1]})


def test_union_concatenates_per_hook():
    a, b = _random_set(0), _random_set(1)
    extra = ConceptSet({"blocks.1.hook_resid_pre": torch.randn(1, 32, dtype=torch.float64)})
    u = a | b | extra
    assert u.hooks == [R0, MLP1, "blocks.1.hook_resid_pre"]
    assert torch.equal(u[R0], torch.cat([a[R0], b[R0]]))
    assert u.labels[R0] == ["a", "b", "c", "a", "b", "c"]
    assert u.scores[MLP1] == [1.0, 2.0, 1.0, 2.0]
    assert u.provenance["method"] == "union"


def test_union_refuses_different_widths():
    with pytest.raises(ValueError, match=f"{R0}.*32 and 16"):
        _random_set().union(ConceptSet({R0: torch.randn(1, 16)}))


# ---- orthonormalisation ----------------------------------------------------------------------


def test_orthonormalised_keeps_span_and_row_directions():
    cs = _random_set()
    assert not cs.is_orthonormal()
    on = cs.orthonormalised()
    assert on.is_orthonormal(atol=1e-12)
    assert on.labels == cs.labels and on.scores == cs.scores
    for hook in cs.hooks:
        q = on[hook].T
        # Same subspace: every input row is unchanged by projecting onto span(Q).
        torch.testing.assert_close(cs[hook] @ q @ q.T, cs[hook], rtol=0, atol=1e-12)
        # Row 0 is the first input row, normalised (QR sign fixed).
        torch.testing.assert_close(on[hook][0], cs[hook][0] / cs[hook][0].norm())
    assert on.provenance["history"][-1] == {"op": "orthonormalised"}


def test_orthonormalised_keeps_dtype_and_works_in_float32():
    cs = _random_set(dtype=torch.float32).orthonormalised()
    assert cs[R0].dtype == torch.float32
    assert cs.is_orthonormal()


def test_dependent_direction_is_an_error_or_dropped():
    v = torch.randn(3, 32, dtype=torch.float64)
    d = torch.stack([v[0], v[1], 2 * v[0] - v[1], v[2]])  # row 2 depends on rows 0, 1
    cs = ConceptSet({R0: d}, labels={R0: ["p", "q", "dup", "r"]})
    with pytest.raises(ValueError, match=rf"{R0}.*direction 2 \(label 'dup'\)"):
        cs.orthonormalised()
    on = cs.orthonormalised(drop_dependent=True)
    assert on.labels[R0] == ["p", "q", "r"]
    assert on.is_orthonormal(atol=1e-12)
    assert on.provenance["history"][-1]["dropped"] == {R0: [2]}


def test_zero_direction_and_too_many_directions():
    with pytest.raises(ValueError, match="direction 0"):
        ConceptSet({R0: torch.zeros(1, 4)}).orthonormalised()
    wide = ConceptSet({R0: torch.randn(5, 4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="direction 4"):
        wide.orthonormalised()
    assert wide.orthonormalised(drop_dependent=True)[R0].shape == (4, 4)


def test_to_changes_dtype_only():
    cs = _random_set()
    cs32 = cs.to(dtype=torch.float32)
    assert cs32[R0].dtype == torch.float32 and cs[R0].dtype == torch.float64
    assert cs32.labels == cs.labels and cs32.provenance == cs.provenance


# ---- validation against a model ----------------------------------------------------------------


def test_validate_accepts_resid_and_probed_hooks(model):
    cs = ConceptSet(
        {
            R0: torch.randn(1, 32),
            MLP1: torch.randn(1, 64),
            "blocks.0.attn.hook_z": torch.randn(1, 8),
        }
    )
    assert cs.validate(model) is cs


def test_validate_unknown_hook_lists_close_matches(model):
    cs = ConceptSet({"blocks.0.hook_resid_pots": torch.randn(1, 32)})
    with pytest.raises(ValueError, match="'blocks.0.hook_resid_pots'.*blocks.0.hook_resid_post"):
        cs.validate(model)


@pytest.mark.parametrize(("hook", "width"), [(R0, 31), (MLP1, 32), ("blocks.0.attn.hook_z", 32)])
def test_validate_width_mismatch_names_hook(model, hook, width):
    with pytest.raises(ValueError, match=f"width mismatch at hook '{hook}'"):
        ConceptSet({hook: torch.randn(1, width)}).validate(model)


# ---- saving and loading ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    cs = _random_set(dtype=dtype)
    cs.save(tmp_path / "set")
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "concepts.json",
        "directions.safetensors",
    ]
    _assert_same(cs, ConceptSet.load(tmp_path / "set"))
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temp folder left behind


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    a, b = _random_set(0), _random_set(1)
    a.save(tmp_path / "set")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        b.save(tmp_path / "set")
    b.save(tmp_path / "set", overwrite=True)
    _assert_same(b, ConceptSet.load(tmp_path / "set"))
    stranger = tmp_path / "notes"
    stranger.mkdir()
    (stranger / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no caft-tl save"):
        a.save(stranger, overwrite=True)
    assert (stranger / "important.txt").read_text() == "keep me"


def test_crash_while_saving_leaves_old_set_intact(tmp_path, monkeypatch):
    old = _random_set(0)
    old.save(tmp_path / "set")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(concepts_module, "write_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        _random_set(1).save(tmp_path / "set", overwrite=True)
    _assert_same(old, ConceptSet.load(tmp_path / "set"))
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_load_errors_name_the_missing_or_corrupt_part(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ConceptSet.load(tmp_path / "nothing")

    path = _random_set().save(tmp_path / "s1")
    (path / "directions.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="directions.safetensors is missing"):
        ConceptSet.load(path)

    path = _random_set().save(tmp_path / "s2")
    (path / "concepts.json").unlink()
    with pytest.raises(FileNotFoundError, match="concepts.json is missing"):
        ConceptSet.load(path)

    path = _random_set().save(tmp_path / "s3")
    (path / "concepts.json").write_text("{not json")
    with pytest.raises(ValueError, match="concepts.json is corrupt"):
        ConceptSet.load(path)

    path = _random_set().save(tmp_path / "s4")
    data = (path / "directions.safetensors").read_bytes()
    (path / "directions.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="directions.safetensors is corrupt"):
        ConceptSet.load(path)

    path = _random_set().save(tmp_path / "s5")
    meta = json.loads((path / "concepts.json").read_text())
    meta["hooks"].append("blocks.1.hook_resid_post")
    (path / "concepts.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lacks the hooks \['blocks.1.hook_resid_post'\]"):
        ConceptSet.load(path)


def test_provenance_helpers_are_deterministic():
    assert data_fingerprint(torch.arange(5)) == data_fingerprint(torch.arange(5))
    assert data_fingerprint(torch.arange(5)) != data_fingerprint(torch.arange(6))
    assert data_fingerprint(["ab"]) != data_fingerprint(["a", "b"])
    prov = make_provenance("pca", model="m", data=["x"], k=20)
    assert prov["method"] == "pca" and prov["parameters"] == {"k": 20}
    assert prov["data"].startswith("sha256:") and "T" in prov["date"]
