"""Streaming PCA of activation differences: exactness against an in-memory SVD, the sign
convention, the assistant-token filter, on-disk caches from two tiny models, errors."""

from __future__ import annotations

import json

import pytest
import torch

import caft_tl as ct
from caft_tl.activations import Activations
from caft_tl.directions import ConceptSet
from caft_tl.directions.pca import BLOCK_ROWS, SIGN_RTOL, explained_variance_figure, pca

H0 = "blocks.0.hook_resid_post"
H1 = "blocks.1.hook_resid_post"
SHARDS = (37, 250, 3, 410, 120)  # unequal sizes, one tiny


def _data(n: int, d: int, seed: int = 0, offset: float = 5.0) -> torch.Tensor:
    """Rows with a decaying spectrum (distinct eigenvalues) and a large mean offset."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(1, -1, d, dtype=torch.float64)
    mean = offset * torch.randn(d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T + mean


def _activations(tensors: dict[str, torch.Tensor], target: torch.Tensor | None = None):
    """In-memory Activations cut into shards of the sizes in SHARDS."""
    n = next(iter(tensors.values())).shape[0]
    assert sum(SHARDS) == n
    target = torch.ones(n, dtype=torch.long) if target is None else target
    chunks, start = [], 0
    for size in SHARDS:
        part = slice(start, start + size)
        chunk = {h: t[part].float() for h, t in tensors.items()}
        chunk["_example"] = torch.arange(start, start + size)
        # Never position 0: pca() skips each example's first token by default.
        chunk["_position"] = torch.arange(1, size + 1, dtype=torch.long)
        chunk["_token"] = torch.zeros(size, dtype=torch.long)
        chunk["_target"] = target[part]
        chunks.append(chunk)
        start += size
    meta = {"n_tokens": n, "n_examples": n, "positions": "all", "model": "synthetic"}
    return Activations(chunks, list(tensors), [[0]] * n, meta)


def _exact(x: torch.Tensor, k: int, center: bool = True):
    """Reference: SVD of the whole (centred) matrix; components with the sign convention."""
    x = x.double()
    mean = x.mean(0)
    xc = x - mean if center else x
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    comps = vh[:k]
    proj = comps @ mean
    comps = comps * torch.sign(proj)[:, None]
    return comps, (s**2 / (s**2).sum())[:k]


def _projector_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a.T @ a - b.T @ b).abs().max())


def _cosines_of_principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(a.double() @ b.double().T)


@pytest.fixture(scope="module")
def synthetic():
    n = sum(SHARDS)
    return {H0: _data(n, 24, seed=0), H1: _data(n, 40, seed=1)}


# ---- exactness -----------------------------------------------------------------------------


def test_streaming_equals_exact_svd(synthetic):
    k = 6
    cs = pca(_activations(synthetic), k=k, progress=False)
    assert cs.hooks == [H0, H1]
    for hook, x in synthetic.items():
        # Shards are stored in float32: the reference sees the same values.
        ref, ratio = _exact(x.float(), k)
        got = cs[hook]
        assert got.shape == (k, x.shape[1]) and got.dtype == torch.float64
        assert _projector_gap(got, ref) < 1e-6
        assert (_cosines_of_principal_angles(got, ref) > 1 - 1e-6).all()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)  # same signs too
        torch.testing.assert_close(
            torch.tensor(cs.scores[hook], dtype=torch.float64), ratio, atol=1e-9, rtol=1e-7
        )
        assert cs.labels[hook] == [f"PC{i}" for i in range(k)]
    assert cs.is_orthonormal(atol=1e-10)


def test_chunking_does_not_matter(synthetic):
    """One chunk vs five shards vs blocks smaller than a shard: same answer."""
    whole = pca({H0: synthetic[H0].float()}, k=4, progress=False)
    sharded = pca(_activations(synthetic), k=4, hooks=H0, progress=False)
    assert _projector_gap(whole[H0], sharded[H0]) < 1e-9
    assert BLOCK_ROWS < 10_000
    big = _data(10_000, 8, seed=3)  # > BLOCK_ROWS rows in one chunk: several blocks
    blocked = pca({H0: big}, k=3, progress=False)
    ref, _ = _exact(big, 3)
    torch.testing.assert_close(blocked[H0], ref, atol=1e-9, rtol=0)


def test_explained_variance_and_provenance(synthetic):
    full = pca(_activations(synthetic), k=24, hooks=[H0], progress=False)
    assert sum(full.scores[H0]) == pytest.approx(1.0, abs=1e-9)
    assert full.scores[H0] == sorted(full.scores[H0], reverse=True)
    cs = pca(_activations(synthetic), k=5, progress=False)
    assert 0 < sum(cs.scores[H1]) < 1
    params = cs.provenance["parameters"]
    assert cs.provenance["method"] == "pca" and cs.provenance["model"] == "synthetic"
    assert params["k"] == 5 and params["center"] and not params["assistant_only"]
    assert params["n_tokens"] == {H0: sum(SHARDS), H1: sum(SHARDS)}
    x = synthetic[H1].float().double()
    var = x.var(0).sum().item()  # sample variance, as in the provenance
    assert params["total_variance"][H1] == pytest.approx(var, rel=1e-9)
    assert params["explained_variance"][H1][0] == pytest.approx(cs.scores[H1][0] * var)
    assert params["mean_diff_norm"][H1] == pytest.approx(x.mean(0).norm().item(), rel=1e-9)
    json.dumps(cs.provenance)  # saveable
    assert (
        pca(_activations(synthetic), k=3, model="mine", progress=False).provenance["model"]
        == "mine"
    )


def test_uncentred(synthetic):
    cs = pca({H0: synthetic[H0]}, k=3, center=False, progress=False)
    ref, ratio = _exact(synthetic[H0], 3, center=False)
    torch.testing.assert_close(cs[H0], ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(
        torch.tensor(cs.scores[H0], dtype=torch.float64), ratio, atol=1e-10, rtol=1e-8
    )
    # Without centring the top direction is (nearly) the mean itself.
    mean = synthetic[H0].mean(0)
    assert float(cs[H0][0] @ mean / mean.norm()) > 0.9


def test_large_mean_does_not_cost_precision():
    """Mean 1e4 against unit spread: naive E[xx^T] - mu mu^T would lose every digit."""
    x = _data(2000, 12, seed=4, offset=0.0) + 1e4
    cs = pca({H0: x}, k=4, progress=False)
    ref, ratio = _exact(x, 4)
    assert _projector_gap(cs[H0], ref) < 1e-6
    torch.testing.assert_close(
        torch.tensor(cs.scores[H0], dtype=torch.float64), ratio, rtol=1e-6, atol=1e-9
    )


def test_deterministic(synthetic):
    a = pca(_activations(synthetic), k=5, progress=False)
    b = pca(_activations(synthetic), k=5, progress=False)
    for hook in a.hooks:
        assert torch.equal(a[hook], b[hook])
        assert a.scores[hook] == b.scores[hook]


# ---- sign convention -----------------------------------------------------------------------


def test_mean_difference_projects_positively(synthetic):
    cs = pca(_activations(synthetic), k=8, progress=False)
    for hook, x in synthetic.items():
        assert (cs[hook] @ x.float().double().mean(0) > 0).all()


def test_sign_fallback_when_mean_is_zero():
    x = _data(300, 10, seed=5, offset=0.0)
    x = torch.cat([x, -x])  # mean exactly zero: no direction "towards the fine-tune"
    cs = pca({H0: x}, k=5, progress=False)
    d = cs[H0]
    assert (d @ x.mean(0)).abs().max() < SIGN_RTOL
    largest = d[torch.arange(5), d.abs().argmax(1)]
    assert (largest > 0).all()
    ref, _ = _exact(x, 5)
    assert _projector_gap(d, ref) < 1e-9


# ---- assistant filter ----------------------------------------------------------------------


def test_assistant_only_equals_pca_of_filtered_rows(synthetic):
    n = sum(SHARDS)
    target = (torch.arange(n) % 3 != 0).long()
    target[37 : 37 + 250] = 0  # one whole shard without assistant tokens
    acts = _activations(synthetic, target)
    got = pca(acts, k=4, assistant_only=True, progress=False)
    keep = target == 1
    want = pca({h: x[keep].float() for h, x in synthetic.items()}, k=4, progress=False)
    for hook in synthetic:
        torch.testing.assert_close(got[hook], want[hook], atol=1e-10, rtol=0)
        assert got.scores[hook] == pytest.approx(want.scores[hook], rel=1e-9)
    assert got.provenance["parameters"]["n_tokens"][H0] == int(keep.sum())
    assert got.provenance["parameters"]["assistant_only"] is True


# ---- real caches from two tiny models --------------------------------------------------------


def _chats(n: int = 10) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Which colour is item {i}?"},
                {"role": "assistant", "content": "It is blue. " * (i % 3 + 1)},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def diff_folder(tiny_model, tokenizer, tmp_path_factory):
    finetuned = ct.models.tiny(tokenizer=tokenizer, seed=1)
    out = tmp_path_factory.mktemp("pca") / "acts"
    ct.activation_diff(
        tiny_model,
        finetuned,
        _chats(),
        [H0, H1],
        out=out,
        batch_size=3,  # batches of 3 examples with 64-token shards: 4 shards, unequal
        shard_tokens=64,
        progress=False,
    )
    return out / "diff"


def test_on_disk_activation_diff(diff_folder):
    acts = Activations.load(diff_folder)
    assert acts.on_disk and len(acts.meta["shards"]) > 2
    cs = pca(diff_folder, k=5, progress=False)  # a folder path
    same = pca(acts, k=5, progress=False)  # the opened Activations
    later = acts.rows.position > 0  # the first token of each example is skipped
    for hook in (H0, H1):
        ref, ratio = _exact(acts[hook][later], 5)
        assert _projector_gap(cs[hook], ref) < 1e-6
        torch.testing.assert_close(cs[hook], ref, atol=1e-6, rtol=0)
        assert cs.scores[hook] == pytest.approx(ratio.tolist(), rel=1e-6)
        assert torch.equal(cs[hook], same[hook])
    prov = cs.provenance
    assert prov["model"] == "tiny-llama-2L-64d"
    assert prov["parameters"]["source"]["kind"] == "diff"
    assert prov["data"].startswith("sha256:")


def test_on_disk_assistant_only(diff_folder):
    acts = Activations.load(diff_folder)
    keep = (acts.rows.target == 1) & (acts.rows.position > 0)
    assert 0 < int(keep.sum()) < len(acts)
    cs = pca(acts, k=3, hooks=[H1], assistant_only=True, progress=False)
    ref, _ = _exact(acts[H1][keep], 3)
    assert cs.hooks == [H1]
    assert _projector_gap(cs[H1], ref) < 1e-6


def test_skip_first_can_be_turned_off(diff_folder):
    acts = Activations.load(diff_folder)
    every = pca(acts, k=3, hooks=[H0], skip_first=False, progress=False)
    ref, _ = _exact(acts[H0], 3)
    assert _projector_gap(every[H0], ref) < 1e-6
    assert every.provenance["parameters"]["n_tokens"][H0] == len(acts)
    skipped = pca(acts, k=3, hooks=[H0], progress=False)
    n_first = int((acts.rows.position == 0).sum())
    assert skipped.provenance["parameters"]["n_tokens"][H0] == len(acts) - n_first


def test_saved_and_loaded(diff_folder, tmp_path):
    cs = pca(diff_folder, k=3, progress=False)
    back = ConceptSet.load(cs.save(tmp_path / "pcs"))
    assert torch.equal(back[H0], cs[H0]) and back.scores == cs.scores
    assert back.provenance == cs.provenance


# ---- errors --------------------------------------------------------------------------------


def test_errors(synthetic, diff_folder):
    small = {H0: synthetic[H0][:50]}
    with pytest.raises(ValueError, match="at least 1"):
        pca(small, k=0, progress=False)
    with pytest.raises(TypeError, match="integer"):
        pca(small, k=2.0, progress=False)
    assert len(pca(small, k=torch.tensor(2), progress=False)) == 2  # integer-like is fine
    with pytest.raises(ValueError, match="exceeds the activation width d=24"):
        pca(small, k=25, progress=False)
    with pytest.raises(ValueError, match="at least 2 rows"):
        pca({H0: synthetic[H0][:1]}, k=1, progress=False)
    with pytest.raises(ValueError, match=r"unknown hooks \['blocks.9.hook_resid_post'\]; avail"):
        pca(diff_folder, k=2, hooks=["blocks.9.hook_resid_post"], progress=False)
    nan = synthetic[H0][:50].clone()
    nan[17, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pca({H0: nan}, k=2, progress=False)
    inf = synthetic[H0][:50].clone()
    inf[0, 0] = float("inf")  # in the first block, which also sets the shift
    with pytest.raises(ValueError, match="NaN or inf"):
        pca({H0: inf}, k=2, progress=False)
    x = synthetic[H0].clone()
    x[37 + 249, 5] = float("nan")  # last row of the second shard (rows 37..286)
    with pytest.raises(ValueError, match=r"NaN or inf \(in rows 37..286 "):
        pca(_activations({H0: x}), k=2, progress=False)
    with pytest.raises(ValueError, match="zero variance"):
        pca({H0: torch.ones(10, 4)}, k=2, progress=False)
    with pytest.raises(ValueError, match="needs row targets"):
        pca(small, k=2, assistant_only=True, progress=False)
    with pytest.raises(ValueError, match="2-D"):
        pca({H0: torch.ones(10)}, k=1, progress=False)
    with pytest.raises(TypeError, match="takes Activations"):
        pca([synthetic[H0]], k=1, progress=False)
    with pytest.raises(FileNotFoundError):
        pca(diff_folder.parent / "nowhere", k=1, progress=False)


def test_empty_after_assistant_filter(synthetic):
    n = sum(SHARDS)
    acts = _activations(synthetic, torch.zeros(n, dtype=torch.long))
    with pytest.raises(ValueError, match="no rows with target == 1"):
        pca(acts, k=2, assistant_only=True, progress=False)
    one = torch.zeros(n, dtype=torch.long)
    one[5] = 1
    with pytest.raises(ValueError, match="at least 2 rows after keeping assistant tokens"):
        pca(_activations(synthetic, one), k=1, assistant_only=True, progress=False)


def test_k_beyond_rank_warns(synthetic):
    with pytest.warns(UserWarning, match="carry no variance"):
        cs = pca({H0: synthetic[H0][:4]}, k=6, progress=False)
    assert cs.is_orthonormal(atol=1e-10)


# ---- figure --------------------------------------------------------------------------------


def test_explained_variance_figure(synthetic):
    cs = pca(_activations(synthetic), k=4, progress=False)
    fig = explained_variance_figure(cs)
    assert len(fig.data) == 4  # a bar and a line per hook
    bar, line = fig.data[0], fig.data[1]
    assert list(bar.y) == pytest.approx(cs.scores[H0])
    assert line.y[-1] == pytest.approx(sum(cs.scores[H0]))
    assert len(explained_variance_figure(cs.select({H1: [0, 2]})).data) == 2
    unscored = ConceptSet({H0: torch.eye(3)})
    with pytest.raises(ValueError, match="no scores"):
        explained_variance_figure(unscored)
