"""Ablation / Steering hooks: the projection identities of every mode, forward and backward,
hook clean-up, errors, and save/load. A float64 tiny model makes the identities exact."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from caft_tl.directions import ConceptSet
from caft_tl.interventions import (
    Ablation,
    Steering,
    load_intervention,
    mean_activations,
)

H = "blocks.0.hook_resid_post"
MLP1 = "blocks.1.mlp.hook_post"
Z0 = "blocks.0.attn.hook_z"
UPSTREAM = "blocks.0.mlp.W_in"  # a parameter computed before H
DOWNSTREAM = "unembed.W_U"  # a parameter after H
ATOL = 1e-10


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=16,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
        gated_mlp=True, seed=0, dtype=torch.float64,
    )  # fmt: skip
    return HookedTransformer(cfg)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference_tokens() -> torch.Tensor:
    return torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(2))


def _orthonormal(widths: dict[str, int], k: int = 3, seed: int = 0) -> ConceptSet:
    g = torch.Generator().manual_seed(seed)
    dirs = {h: torch.randn(k, w, generator=g, dtype=torch.float64) for h, w in widths.items()}
    return ConceptSet(dirs).orthonormalised()


@pytest.fixture(scope="module")
def concepts() -> ConceptSet:
    return _orthonormal({H: 32})


def _projector(concepts: ConceptSet, hook: str = H) -> torch.Tensor:
    q = concepts[hook].T
    return q @ q.T  # independent of the package's maths: an explicit d x d matrix


def _run(model, tokens, middle=(), hook=H):
    """Forward with ``middle`` hooks at ``hook``; capture the activation entering (x) and
    leaving (y) them, so gradients w.r.t. the hook input can be taken."""
    seen = {}

    def grab(key):
        def fn(act, hook):
            seen[key] = act

        return fn

    hooks = [(hook, grab("x")), *middle, (hook, grab("y"))]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return logits, seen["x"], seen["y"]


def _loss(logits: torch.Tensor) -> torch.Tensor:
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3), dtype=logits.dtype)
    return (logits * w).sum() + (logits**2).mean()


def _grads(model, logits, *wrt):
    """Gradients of the loss w.r.t. activations and named parameters (no .grad mutation)."""
    params = dict(model.named_parameters())
    targets = [params[w] if isinstance(w, str) else w for w in wrt]
    return torch.autograd.grad(_loss(logits), targets)


# ---- forward identities ------------------------------------------------------------------------


def test_zero_ablation_leaves_no_projection(model, tokens, concepts):
    ablation = Ablation(concepts, mode="zero")
    _, x, y = _run(model, tokens, ablation.fwd_hooks(model))
    q = concepts[H].T
    torch.testing.assert_close(y @ q, torch.zeros_like(y @ q), rtol=0, atol=ATOL)
    torch.testing.assert_close(y, x - x @ _projector(concepts), rtol=0, atol=ATOL)
    assert (x @ q).abs().max() > 0.1  # there was something to remove


def test_applied_context_and_run_with_hooks_agree(model, tokens, concepts):
    ablation = Ablation(concepts)
    with ablation.applied(model):
        inside = model(tokens)
    composed = model.run_with_hooks(tokens, fwd_hooks=ablation.fwd_hooks(model))
    assert torch.equal(inside, composed)
    assert not torch.allclose(inside, model(tokens))


def test_mean_ablation_sets_projection_to_the_means(model, tokens, reference_tokens, concepts):
    ablation = Ablation(concepts, mode="mean").fit_mean(model, reference_tokens)
    mu = ablation.mean[H]
    q = concepts[H].T
    _, x, y = _run(model, tokens, ablation.fwd_hooks(model))
    torch.testing.assert_close(y @ q, (mu @ q).expand_as(y @ q), rtol=0, atol=ATOL)
    torch.testing.assert_close(y, x - (x - mu) @ _projector(concepts), rtol=0, atol=ATOL)


def test_fit_mean_matches_masked_mean(model, reference_tokens):
    mask = torch.zeros(reference_tokens.shape, dtype=torch.bool)
    mask[:, 5:] = True
    means = mean_activations(model, [H, MLP1], reference_tokens, mask=mask, batch_size=3)
    _, cache = model.run_with_cache(reference_tokens)
    for hook in (H, MLP1):
        torch.testing.assert_close(means[hook], cache[hook][mask].mean(0), rtol=0, atol=ATOL)
    batches = [(reference_tokens[:2], mask[:2]), {"tokens": reference_tokens[2:], "mask": mask[2:]}]
    torch.testing.assert_close(mean_activations(model, [H], batches)[H], means[H])


def test_steering_minus_one_reproduces_zero_ablations_mean_shift(model, tokens, concepts):
    # mu measured on the very tokens we intervene on, so the identity is exact.
    steer = Steering(concepts, coef=-1.0).fit_mean(model, tokens)
    _, h, h_zero = _run(model, tokens, Ablation(concepts).fwd_hooks(model))
    _, h2, h_steer = _run(model, tokens, steer.fwd_hooks(model))
    assert torch.equal(h, h2)  # the hook input does not depend on the intervention
    shift = -steer.mean[H] @ _projector(concepts)
    torch.testing.assert_close((h_zero - h).mean((0, 1)), shift, rtol=0, atol=ATOL)
    torch.testing.assert_close((h_steer - h).mean((0, 1)), shift, rtol=0, atol=ATOL)
    torch.testing.assert_close(h_steer - h, shift.expand_as(h), rtol=0, atol=ATOL)


def test_steering_by_explicit_vectors(model, tokens):
    v = torch.randn(32, dtype=torch.float64)
    _, x, y = _run(model, tokens, Steering(None, 2.5, vectors={H: v}).fwd_hooks(model))
    torch.testing.assert_close(y, x + 2.5 * v, rtol=0, atol=ATOL)


def test_several_hooks_at_once_including_per_head_hook(model, tokens):
    concepts = _orthonormal({H: 32, MLP1: 64, Z0: 8}, k=2)
    seen = {}

    def grab(act, hook):
        seen[hook.name] = act

    with Ablation(concepts).applied(model), model.hooks([(h, grab) for h in concepts.hooks]):
        model(tokens)  # grab hooks were added later, so they see the ablated activations
    assert seen[Z0].ndim == 4
    for hook in concepts.hooks:
        proj = seen[hook] @ concepts[hook].T
        torch.testing.assert_close(proj, torch.zeros_like(proj), rtol=0, atol=ATOL)


# ---- backward identities -----------------------------------------------------------------------


def test_detached_mode_has_zero_forward_and_identity_backward(model, tokens, concepts):
    p = _projector(concepts)
    logits_z, x_z, y_z = _run(model, tokens, Ablation(concepts, "zero").fwd_hooks(model))
    logits_d, x_d, y_d = _run(model, tokens, Ablation(concepts, "detached").fwd_hooks(model))
    assert torch.equal(y_d, y_z) and torch.equal(logits_d, logits_z)

    gx_z, gup_z = _grads(model, logits_z, x_z, UPSTREAM)
    gx_d, gy_d, gup_d = _grads(model, logits_d, x_d, y_d, UPSTREAM)
    torch.testing.assert_close(gx_d, gy_d, rtol=0, atol=ATOL)  # identity Jacobian
    # zero's gradient at the hook input is detached's, projected by (I - QQ^T)
    torch.testing.assert_close(gx_z, gx_d - gx_d @ p, rtol=0, atol=ATOL)

    # Reference with no gradient effect: inject zero-mode's activation as a constant offset.
    offset = (y_z - x_z).detach()
    logits_r, _, _ = _run(model, tokens, [(H, lambda act, hook: act + offset)])
    (gup_r,) = _grads(model, logits_r, UPSTREAM)
    torch.testing.assert_close(gup_d, gup_r, rtol=1e-9, atol=ATOL)
    assert not torch.allclose(gup_d, gup_z)  # zero mode's upstream gradient does differ


def test_gradient_mode_has_identity_forward_and_projected_backward(model, tokens, concepts):
    p = _projector(concepts)
    logits_p, x_p, _ = _run(model, tokens)
    logits_g, x_g, y_g = _run(model, tokens, Ablation(concepts, "gradient").fwd_hooks(model))
    assert torch.equal(logits_g, logits_p) and torch.equal(y_g, x_g)

    gx_p, gdown_p = _grads(model, logits_p, x_p, DOWNSTREAM)
    gx_g, gdown_g = _grads(model, logits_g, x_g, DOWNSTREAM)
    torch.testing.assert_close(gx_g, gx_p - gx_p @ p, rtol=0, atol=ATOL)
    proj = gx_g @ concepts[H].T
    torch.testing.assert_close(proj, torch.zeros_like(proj), rtol=0, atol=ATOL)
    torch.testing.assert_close(gdown_g, gdown_p, rtol=0, atol=ATOL)  # after the hook: untouched


def test_gradient_mode_upstream_gradient_after_the_with_block(model, tokens, concepts):
    # Backward runs after the hooks are gone: the custom autograd node must still project.
    with Ablation(concepts, "gradient").applied(model):
        logits = model(tokens)
    (g_up,) = _grads(model, logits, UPSTREAM)

    # Reference by the chain rule on a plain run: push (I - QQ^T) dL/dx further upstream.
    logits_p, x_p, _ = _run(model, tokens)
    (gx_p,) = torch.autograd.grad(_loss(logits_p), x_p, retain_graph=True)
    w_in = dict(model.named_parameters())[UPSTREAM]
    projected = gx_p - gx_p @ _projector(concepts)
    (g_ref,) = torch.autograd.grad(x_p, w_in, grad_outputs=projected, retain_graph=True)
    (g_plain,) = _grads(model, logits_p, UPSTREAM)
    torch.testing.assert_close(g_up, g_ref, rtol=1e-9, atol=ATOL)
    assert not torch.allclose(g_up, g_plain)


# ---- orthonormalisation, devices/dtypes, errors --------------------------------------------------


def test_non_orthonormal_directions_are_orthonormalised_with_a_warning(model, tokens):
    raw = ConceptSet({H: torch.randn(2, 32, dtype=torch.float64)})
    with pytest.warns(UserWarning, match="not orthonormal.*QR"):
        ablation = Ablation(raw)
    assert ablation.concepts.is_orthonormal(atol=1e-12)
    _, _, y = _run(model, tokens, ablation.fwd_hooks(model))
    proj = y @ raw[H].T  # the original (non-orthonormal) directions are removed too
    torch.testing.assert_close(proj, torch.zeros_like(proj), rtol=0, atol=ATOL)


def test_orthonormal_directions_raise_no_warning(concepts):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ablation(concepts)


def test_tensors_are_moved_once_per_dtype(model, tokens):
    concepts32 = _orthonormal({H: 32}).to(dtype=torch.float32)
    ablation = Ablation(concepts32)
    with ablation.applied(model):
        model(tokens)
        model(tokens)
    assert list(ablation._cache) == [(H, torch.device("cpu"), torch.float64)]
    q, _ = ablation._cache[(H, torch.device("cpu"), torch.float64)]
    assert q.dtype == torch.float64 and q.shape == (32, 3)


def test_width_and_hook_errors_name_the_hook(model):
    with pytest.raises(ValueError, match=f"width mismatch at hook '{H}'"):
        Ablation(_orthonormal({H: 16})).fwd_hooks(model)
    with (
        pytest.raises(ValueError, match=f"width mismatch at hook '{Z0}'.*\\(4, 8\\)"),
        Ablation(_orthonormal({Z0: 32})).applied(model),
    ):
        pass
    with pytest.raises(ValueError, match="'blocks.0.hook_resid_psot'.*blocks.0.hook_resid_post"):
        Ablation(_orthonormal({"blocks.0.hook_resid_psot": 32})).fwd_hooks(model)
    with pytest.raises(ValueError, match="width 16, directions 32"):
        Ablation(_orthonormal({H: 32}), mode="mean", mean={H: torch.zeros(16)})


def test_mean_mode_without_mean_fails_when_applied(model, concepts):
    ablation = Ablation(concepts, mode="mean")  # fine until it is used
    with pytest.raises(ValueError, match=f"mean activation at hook '{H}'.*fit_mean"):
        ablation.applied(model).__enter__()
    assert not model.hook_dict[H].fwd_hooks
    with pytest.raises(ValueError, match="fit_mean"):
        Steering(concepts, -1.0).fwd_hooks(model)


def test_bad_arguments(concepts):
    with pytest.raises(ValueError, match="unknown ablation mode"):
        Ablation(concepts, mode="half")
    with pytest.raises(ValueError, match="exactly one"):
        Steering(None, 1.0)
    with pytest.raises(ValueError, match="exactly one"):
        Steering(concepts, 1.0, vectors={H: torch.zeros(32)})


def _no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_hooks_are_removed_when_the_block_raises(model, tokens, concepts, error):
    plain = model(tokens)
    interventions = [
        Ablation(_orthonormal({H: 32, MLP1: 64}), "detached"),
        Steering(None, 1.0, vectors={H: torch.ones(32, dtype=torch.float64)}),
    ]
    for intervention in interventions:
        with pytest.raises(error), intervention.applied(model):
            assert model.hook_dict[H].fwd_hooks
            model(tokens)
            raise error("stop")
        assert _no_hooks_left(model)
    assert torch.equal(model(tokens), plain)


# ---- saving and loading --------------------------------------------------------------------------


def _assert_same_intervention(a, b) -> None:
    assert type(a) is type(b)
    assert getattr(a, "mode", None) == getattr(b, "mode", None)
    assert getattr(a, "coef", None) == getattr(b, "coef", None)
    assert (a.concepts is None) == (b.concepts is None)
    if a.concepts is not None:
        for hook in a.concepts.hooks:
            assert torch.equal(a.concepts[hook], b.concepts[hook])
        assert a.concepts.labels == b.concepts.labels
    assert a.mean.keys() == b.mean.keys()
    for hook in a.mean:
        assert a.mean[hook].dtype == b.mean[hook].dtype
        assert torch.equal(a.mean[hook], b.mean[hook])
    for hook, v in getattr(a, "vectors", {}).items():
        assert torch.equal(v, b.vectors[hook])


@pytest.mark.parametrize("mode", ["zero", "mean", "detached", "gradient"])
def test_ablation_round_trip(tmp_path, model, tokens, reference_tokens, mode):
    ablation = Ablation(_orthonormal({H: 32, MLP1: 64}), mode=mode)
    if mode == "mean":
        ablation.fit_mean(model, reference_tokens)
    ablation.save(tmp_path / "abl")
    loaded = load_intervention(tmp_path / "abl")
    _assert_same_intervention(ablation, loaded)
    assert isinstance(Ablation.load(tmp_path / "abl"), Ablation)
    with ablation.applied(model):
        before = model(tokens)
    with loaded.applied(model):
        after = model(tokens)
    # Tensors are equal bit for bit (above); BLAS results may still differ in the last bit
    # with memory alignment, so outputs are compared to float64 precision.
    torch.testing.assert_close(after, before, rtol=0, atol=ATOL)
    # The folder is also a plain ConceptSet.
    assert torch.equal(ConceptSet.load(tmp_path / "abl")[H], ablation.concepts[H])


def test_steering_round_trips(tmp_path, model, reference_tokens, concepts):
    by_mean = Steering(concepts, -3.0).fit_mean(model, reference_tokens)
    by_vector = Steering(None, 0.5, vectors={H: torch.randn(32), MLP1: torch.randn(64)})
    for name, steer in [("mean", by_mean), ("vector", by_vector)]:
        loaded = load_intervention(steer.save(tmp_path / name))
        _assert_same_intervention(steer, loaded)
    with pytest.raises(TypeError, match="holds a Steering, not a Ablation"):
        Ablation.load(tmp_path / "mean")


def test_load_intervention_errors(tmp_path, concepts):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_intervention(tmp_path / "missing")
    path = concepts.save(tmp_path / "just_concepts")
    with pytest.raises(FileNotFoundError, match="intervention.json is missing"):
        load_intervention(path)
    path = Ablation(concepts).save(tmp_path / "abl")
    (path / "intervention.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="intervention.safetensors is corrupt"):
        load_intervention(path)
