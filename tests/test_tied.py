"""Tied input/output embeddings (caft_tl.models.tie_embeddings): one matrix, as Hugging Face
trains it, through save/load, deepcopy, gradients and the fast paths."""

from __future__ import annotations

import copy

import pytest
import torch

import caft_tl as ct
from caft_tl import models
from caft_tl.models import TiedUnembed, tie_embeddings, tiny
from tests.test_models import _save_random_hf


def _tied(**kwargs):
    return tie_embeddings(tiny(tokenizer=None, seed=0, **kwargs))


def _tokens():
    return torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))


def test_tied_unembedding_is_the_embedding():
    untied = tiny(tokenizer=None, seed=0)
    with torch.no_grad():
        untied.unembed.W_U.copy_(untied.embed.W_E.T)
    expected = untied(_tokens())
    model = tie_embeddings(copy.deepcopy(untied))
    assert isinstance(model.unembed, TiedUnembed)
    assert model.W_U.data_ptr() == model.W_E.data_ptr()
    assert "unembed.W_U" not in model.state_dict()
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_untied - model.W_E.numel()
    torch.testing.assert_close(model(_tokens()), expected, rtol=1e-5, atol=1e-5)
    assert models.model_info(model)["tied_embeddings"] is True
    assert tie_embeddings(model) is model  # idempotent


def test_tied_gradient_is_the_sum_of_both_uses():
    untied = tiny(tokenizer=None, seed=0, fast=False)
    with torch.no_grad():
        untied.unembed.W_U.copy_(untied.embed.W_E.T)
    model = tie_embeddings(copy.deepcopy(untied))
    untied(_tokens()).logsumexp(-1).sum().backward()
    model(_tokens()).logsumexp(-1).sum().backward()
    expected = untied.embed.W_E.grad + untied.unembed.W_U.grad.T
    torch.testing.assert_close(model.embed.W_E.grad, expected, rtol=1e-5, atol=1e-6)


def test_training_moves_both_ends_together():
    model = _tied()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model(_tokens()).logsumexp(-1).sum().backward()
    opt.step()
    assert torch.equal(model.W_U, model.W_E.T)


def test_deepcopy_links_the_copy_to_its_own_embedding():
    model = _tied()
    clone = copy.deepcopy(model)
    assert clone.unembed._embed is clone.embed
    with torch.no_grad():
        clone.embed.W_E.add_(1.0)
    assert torch.equal(clone.W_U, clone.W_E.T)
    assert not torch.equal(model.W_U, clone.W_U)


def test_hooks_on_the_unembedding_still_fire():
    model = _tied()
    _, cache = model.run_with_cache(_tokens(), names_filter=["unembed.hook_in"])
    assert cache["unembed.hook_in"].shape == (2, 9, model.cfg.d_model)


def test_checkpoint_round_trip_keeps_the_tie(tmp_path):
    model = _tied()
    ct.save_model(model, tmp_path / "ckpt")
    loaded = ct.load_model(tmp_path / "ckpt", device="cpu")
    assert isinstance(loaded.unembed, TiedUnembed) and loaded.cfg.tie_word_embeddings
    assert torch.equal(loaded(_tokens()), model(_tokens()))


def test_different_output_vocabulary_cannot_be_tied():
    model = tiny(tokenizer=None)
    model.cfg.d_vocab_out = model.cfg.d_vocab + 1
    with pytest.raises(ValueError, match="cannot tie embeddings"):
        tie_embeddings(model)


@pytest.mark.parametrize(
    ("kind", "tied"),
    [("llama", True), ("qwen2", False), ("gemma2", False)],
    ids=["llama-tied", "qwen2-untied", "gemma2-scaled"],
)
def test_hf_folders_tie_when_hugging_face_does(kind, tied, tmp_path):
    # Gemma ties in HF, but TransformerLens folds sqrt(d_model) into W_E, so W_U != W_E.T.
    _save_random_hf(kind, tmp_path)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model = ct.load_model(tmp_path, device="cpu")
    assert isinstance(model.unembed, TiedUnembed) is tied
    assert model.cfg.tie_word_embeddings is tied


def _linear_grads(fn, x, w, b, out_grad):
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    out = fn(x, w, b)
    out.backward(out_grad)
    return out, [x.grad, w.grad, b.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)], ids=["2d", "3d"])
def test_tied_product_has_f_linear_bits(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    w = torch.randn(301, 24, generator=gen, dtype=dtype)
    b = torch.randn(301, generator=gen, dtype=dtype)
    out_grad = torch.randn(*shape[:-1], 301, generator=gen, dtype=dtype)
    ours, our_grads = _linear_grads(models._tied_linear, x, w, b, out_grad)
    theirs, their_grads = _linear_grads(torch.nn.functional.linear, x, w, b, out_grad)
    assert torch.equal(ours, theirs)
    for got, expected in zip(our_grads, their_grads, strict=True):
        assert torch.equal(got, expected)


def test_tied_product_gives_only_the_gradients_asked_for():
    x = torch.randn(4, 8)
    w = torch.randn(30, 8, requires_grad=True)
    b = torch.zeros(30)  # frozen bias, input without gradient
    models._tied_linear(x, w, b).sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None


def test_tied_product_supports_second_derivatives():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 8, generator=gen), torch.randn(30, 8, generator=gen)
    b = torch.randn(30, generator=gen)

    def hvp(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xx, ww, b).logsumexp(-1).sum()
        (gw,) = torch.autograd.grad(loss, ww, create_graph=True)
        (gx,) = torch.autograd.grad(gw.square().sum(), xx)
        return gx

    torch.testing.assert_close(
        hvp(models._tied_linear), hvp(torch.nn.functional.linear), rtol=1e-6, atol=1e-6
    )


def _accumulations(model, tokens):
    """(in-place, out-of-place) additions of ``[d_vocab, d_model]`` tensors in a backward."""
    from torch.profiler import ProfilerActivity, profile

    shape = [model.cfg.d_vocab, model.cfg.d_model]
    loss = model(tokens).logsumexp(-1).sum()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    count = {"aten::add_": 0, "aten::add": 0}
    for event in prof.events():
        if event.name in count and event.input_shapes[:2] == [shape, shape]:
            count[event.name] += 1
    return count["aten::add_"], count["aten::add"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_the_two_embedding_gradients_are_summed_in_place(fast):
    # Autograd sums W_E's two gradients in place only when it holds the sole reference to
    # one; with F.linear's weight gradient (a view) it allocates a third [vocab, d] tensor.
    model = tie_embeddings(tiny(tokenizer=None, seed=0, fast=fast))
    assert _accumulations(model, _tokens()) == (1, 0)
