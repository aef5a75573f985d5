"""The fast forward paths (caft_tl.fast) against TransformerLens's own: logits, gradients,
padding, key-value caching, hooks and configuration fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.components import Embed, GatedMLP, GroupedQueryAttention, TransformerBlock

import caft_tl as ct
from caft_tl.fast import (
    FastAttention,
    FastEmbed,
    FastGatedMLP,
    FastGroupedQueryAttention,
    FastTransformerBlock,
    FastUnembed,
    accelerate,
    is_accelerated,
    plain_forward,
)
from caft_tl.models import tiny
from tests.test_models import TINY_HF_CONFIGS, _save_random_hf

REL = 1e-4  # the bar: logits within 1e-4 relative in fp32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest entry; equal infinities (masked attention
    scores) count as equal."""
    same_inf = torch.isinf(a) & (a == b)
    a, b = a.masked_fill(same_inf, 0), b.masked_fill(same_inf, 0)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _pair(**kwargs):
    """A plain TransformerLens model and an accelerated copy with the same weights."""
    plain = tiny(tokenizer=None, fast=False, **kwargs)
    with torch.no_grad():  # random norms, so a wrong normalisation shows
        for name, p in plain.named_parameters():
            if name.endswith(".w"):
                p.add_(0.2 * torch.randn_like(p))
    return plain, accelerate(copy.deepcopy(plain))


def _tokens(batch=3, pos=12, seed=0):
    return torch.randint(0, 1000, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _left_padded_mask(batch=3, pos=12):
    mask = torch.ones(batch, pos, dtype=torch.long)
    mask[0, :5] = 0  # pad queries that have no key at all: TransformerLens gives z = 0
    mask[1, :1] = 0
    return mask


@pytest.fixture(params=[2, None], ids=["gqa", "mha"])
def pair(request):
    return _pair(n_key_value_heads=request.param, n_layers=2)


def test_classes_are_switched_and_restored():
    plain, fast = _pair()
    assert not is_accelerated(plain) and is_accelerated(fast)
    assert type(fast.blocks[0]) is FastTransformerBlock
    assert type(fast.blocks[0].attn) is FastGroupedQueryAttention
    assert type(fast.blocks[0].mlp) is FastGatedMLP
    assert type(fast.unembed) is FastUnembed
    assert type(fast.embed) is FastEmbed
    assert isinstance(fast.blocks[0].mlp, GatedMLP)  # still what TransformerLens checks for
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert list(fast.hook_dict) == list(plain.hook_dict)
    accelerate(fast, enable=False)
    assert not is_accelerated(fast)
    assert type(fast.blocks[0].attn) is GroupedQueryAttention
    assert type(fast.blocks[0]) is TransformerBlock
    assert type(_pair(n_key_value_heads=None)[1].blocks[0].attn) is FastAttention


def test_plain_forward_block_restores_what_was_there():
    plain, fast = _pair()
    tokens = _tokens()
    with torch.no_grad(), plain_forward(fast) as model:
        assert model is fast and not is_accelerated(fast)
        assert torch.equal(fast(tokens), plain(tokens))  # the very same code path
    assert is_accelerated(fast)
    with pytest.raises(RuntimeError, match="boom"), plain_forward(fast):
        raise RuntimeError("boom")
    assert is_accelerated(fast)
    with plain_forward(plain):
        pass
    assert not is_accelerated(plain)  # not switched on where it was off


def test_defaults_are_fast_and_opt_out():
    assert is_accelerated(tiny(tokenizer=None))
    assert not is_accelerated(tiny(tokenizer=None, fast=False))


# 3 x 12 token rows take the per-head q/k/v GEMM, 3 x 50 TransformerLens's projection.
@pytest.mark.parametrize("pos", [12, 50], ids=["short", "long"])
@pytest.mark.parametrize("padding", ["none", "ones", "left", "right"])
def test_logits_and_gradients_match(pair, padding, pos):
    plain, fast = pair
    tokens = _tokens(pos=pos)
    kwargs = {}
    if padding == "ones":  # a mask with no padding in it
        kwargs["attention_mask"] = torch.ones(3, pos, dtype=torch.long)
    elif padding == "left":
        kwargs["attention_mask"] = _left_padded_mask(pos=pos)
    elif padding == "right":
        kwargs["attention_mask"] = _left_padded_mask(pos=pos).flip(-1)
    grads = []
    for model in (plain, fast):
        model.zero_grad(set_to_none=True)
        logits = model(tokens, **kwargs)
        (logits.float().logsumexp(-1) * torch.linspace(0.5, 1.5, pos)).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        grads.append(logits.detach())
    assert _rel(grads[3], grads[1]) < REL
    for name, g in grads[0].items():
        assert torch.isfinite(grads[2][name]).all(), name
        assert _rel(grads[2][name], g) < REL, name


def test_a_mask_without_padding_takes_the_unmasked_route(pair, monkeypatch):
    # An unpadded batch's all-ones mask masks nothing: the causal kernel (faster than SDPA
    # with a mask) and the same bits as no mask, forward and backward.
    _, fast = pair
    tokens = _tokens(pos=20)
    masked = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masked.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = []
    for kwargs in ({}, {"attention_mask": torch.ones(3, 20, dtype=torch.long)}):
        fast.zero_grad(set_to_none=True)
        logits = fast(tokens, **kwargs)
        logits.float().logsumexp(-1).mean().backward()
        out.append((logits.detach(), [p.grad.clone() for p in fast.parameters()]))
    assert masked == [False] * 4  # two layers, two forwards
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))
    fast(tokens, attention_mask=_left_padded_mask(pos=20))
    assert masked[4:] == [True, True]


def _prefill(model, tokens, mask, n):
    """A key-value cache holding the first ``n`` positions, and their logits."""
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(tokens))
    return cache, model(tokens[:, :n], attention_mask=mask[:, :n], past_kv_cache=cache)


def _decode(model, tokens, mask, cache, start, stop):
    """Logits of positions ``start..stop-1``, one token per forward through ``cache``."""
    return [
        model(tokens[:, t : t + 1], attention_mask=mask[:, t : t + 1], past_kv_cache=cache)
        for t in range(start, stop)
    ]


def test_key_value_cache_matches_full_forward(pair):
    plain, fast = pair
    tokens = _tokens(pos=10)
    mask = _left_padded_mask(pos=10)
    with torch.no_grad():
        full = plain(tokens, attention_mask=mask)
        for model in (plain, fast):
            cache, first = _prefill(model, tokens, mask, 7)
            got = torch.cat([first, *_decode(model, tokens, mask, cache, 7, 10)], dim=1)
            assert _rel(got, full) < REL


def test_key_value_cache_survives_dropped_rows_edits_and_switching_paths(pair):
    # The fast path remembers rotated keys beside the cache; whatever happens to the cache,
    # it must continue exactly as TransformerLens would from the same cache.
    plain, fast = pair
    tokens, mask = _tokens(pos=12), _left_padded_mask(pos=12)
    with torch.no_grad():
        cache, _ = _prefill(fast, tokens, mask, 6)
        _decode(fast, tokens, mask, cache, 6, 8)
        keep = torch.tensor([0, 2])  # a row finished: drop it, as the sampler does
        for entry in cache.entries:
            entry.past_keys, entry.past_values = entry.past_keys[keep], entry.past_values[keep]
        cache.previous_attention_mask = cache.previous_attention_mask[keep]
        tokens, mask = tokens[keep], mask[keep]
        got = _decode(fast, tokens, mask, cache, 8, 10)
        cache.entries[0].past_keys.mul_(0.5)  # edited in place: rotate everything again
        edited = copy.deepcopy(cache)
        got += _decode(fast, tokens, mask, cache, 10, 11)
        # TransformerLens's own forward continues the same cache the same way.
        want_edited = _decode(plain, tokens, mask, edited, 10, 11)
        full = plain(tokens[:, :11], attention_mask=mask[:, :11])
    assert _rel(torch.cat(got[:2], dim=1), full[:, 8:10]) < REL
    assert _rel(got[2], want_edited[0]) < REL
    assert _rel(got[2], full[:, 10:11]) > 1e-3  # the edit did change the answer


def test_key_value_cache_under_inference_mode(pair):
    # Inference tensors have no version counter; the rotated-key memo must stand aside.
    plain, fast = pair
    tokens, mask = _tokens(pos=9), _left_padded_mask(pos=9)
    with torch.inference_mode():
        cache, _ = _prefill(fast, tokens, mask, 6)
        got = torch.cat(_decode(fast, tokens, mask, cache, 6, 9), dim=1)
        full = plain(tokens, attention_mask=mask)
    assert _rel(got, full[:, 6:]) < REL


def test_run_with_cache_gives_the_same_activations(pair):
    plain, fast = pair
    tokens = _tokens()
    _, want = plain.run_with_cache(tokens)
    _, got = fast.run_with_cache(tokens)
    assert set(got.keys()) == set(want.keys())
    assert "blocks.0.attn.hook_pattern" in got
    for name in want:
        assert _rel(got[name], want[name]) < REL, name


@pytest.mark.parametrize(
    "hook_name",
    [
        "blocks.0.attn.hook_pattern",  # the fast attention must fall back
        "blocks.1.attn.hook_attn_scores",
        "blocks.0.ln1.hook_normalized",  # the fast block must fall back
        "blocks.0.attn.hook_z",  # computed by the fast path: must still fire
        "blocks.1.attn.hook_rot_k",
        "blocks.0.mlp.hook_post",
        "unembed.hook_in",
        "blocks.1.hook_resid_mid",
    ],
)
def test_editing_hooks_have_the_same_effect(pair, hook_name):
    plain, fast = pair
    tokens = _tokens()
    calls = {"plain": 0, "fast": 0}

    def edit(key):
        def hook(act, hook):
            calls[key] += 1
            return act * 0.5

        return hook

    outs = {}
    for key, model in (("plain", plain), ("fast", fast)):
        with torch.no_grad():
            outs[key] = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, edit(key))])
    assert calls["fast"] >= 1 and calls["plain"] >= 1
    with torch.no_grad():
        untouched = plain(tokens)
    assert _rel(outs["plain"], untouched) > 1e-3  # the edit does something
    assert _rel(outs["fast"], outs["plain"]) < REL


def test_backward_hook_on_pattern_still_fires(pair):
    _, fast = pair
    seen = []
    fast.add_hook("blocks.0.attn.hook_pattern", lambda g, hook: seen.append(g.shape), dir="bwd")
    try:
        fast(_tokens()).sum().backward()
    finally:
        fast.reset_hooks()
    assert seen and seen[0][-1] == 12


def test_configuration_fallbacks_match(pair):
    plain, fast = pair
    tokens = _tokens()
    for model in (plain, fast):
        model.set_use_attn_result(True)  # per-head results: TransformerLens's path
    try:
        _, want = plain.run_with_cache(tokens, names_filter=lambda n: "hook_result" in n)
        _, got = fast.run_with_cache(tokens, names_filter=lambda n: "hook_result" in n)
        assert len(got) == plain.cfg.n_layers
        for name in want:
            assert _rel(got[name], want[name]) < REL
    finally:
        for model in (plain, fast):
            model.set_use_attn_result(False)


@pytest.mark.parametrize("pos", [12, 50], ids=["short", "long"])
def test_query_key_norm_matches(pos):
    # Qwen3 / Gemma-3 style RMSNorm on each head's q and k, applied after the projection.
    from transformer_lens import HookedTransformer

    cfg = tiny(tokenizer=None).cfg.to_dict() | {"use_qk_norm": True}
    plain = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith(".w"):
                p.add_(0.2 * torch.randn_like(p))
    fast = accelerate(copy.deepcopy(plain))
    assert plain.blocks[0].attn.q_norm is not None
    tokens = _tokens(pos=pos)
    with torch.no_grad():
        assert _rel(fast(tokens), plain(tokens)) < REL


def test_lora_on_an_accelerated_model(pair):
    from caft_tl.lora import apply_lora, lora_parameters

    plain, fast = (copy.deepcopy(m) for m in pair)
    cfg = ct.LoraConfig(r=2, targets=("W_Q", "W_O", "W_in", "W_out"))
    for model in (plain, fast):
        apply_lora(model, cfg)
        with torch.no_grad():  # B starts at zero: give the adapters an effect
            for i, p in enumerate(lora_parameters(model)):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    tokens = _tokens()
    with torch.no_grad():
        assert _rel(fast(tokens), plain(tokens)) < REL


@pytest.mark.parametrize("kind", sorted(TINY_HF_CONFIGS))
def test_hf_architectures_fast_equals_plain(kind, tmp_path):
    """Gemma-2 (soft-capping, local attention, pre+post norms) and GPT-2 (learned positions,
    LayerNorm, plain MLP) exercise the fallbacks; Llama, Qwen2 and Mistral the fast path."""
    _save_random_hf(kind, tmp_path)
    with pytest.warns(UserWarning, match="no tokenizer"):
        fast = ct.load_model(tmp_path, device="cpu")
    with pytest.warns(UserWarning, match="no tokenizer"):
        plain = ct.load_model(tmp_path, device="cpu", fast=False)
    assert is_accelerated(fast) and not is_accelerated(plain)
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            assert _rel(fast(tokens, **kwargs), plain(tokens, **kwargs)) < REL


@pytest.mark.slow
def test_embedded_fast_equals_plain(embedded_model):
    plain = accelerate(copy.deepcopy(embedded_model), enable=False)
    tokens = _tokens(batch=2, pos=24, seed=3) * 40
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0
    grads = []
    for model in (plain, embedded_model):
        model.zero_grad(set_to_none=True)
        logits = model(tokens, attention_mask=mask)
        logits.logsumexp(-1).mean().backward()
        grads.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    assert _rel(grads[1][0], grads[0][0]) < REL
    worst = max(_rel(grads[1][1][n], g) for n, g in grads[0][1].items())
    assert worst < 1e-3  # gradients sum many more terms than logits


# ------------------------------------------------ regressions found by reading (issue 21)


def _decoded(model, tokens, mask, start, hooks=()):
    """Prefill ``start`` positions, then decode one token at a time (gradients off, not
    inference mode), with ``hooks`` on throughout."""
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        cache, first = _prefill(model, tokens, mask, start)
        return torch.cat([first, *_decode(model, tokens, mask, cache, start, tokens.shape[1])], 1)


def test_dynamic_ntk_rotary_with_a_cache_matches_transformer_lens():
    plain, fast = _pair()
    for model in (plain, fast):  # Qwen-1 style: the rotary base widens past 6 positions
        model.cfg.use_dynamic_ntk_rope, model.cfg.train_seq_length = True, 6
    tokens, mask = _tokens(pos=14), torch.ones(3, 14, dtype=torch.long)
    want = _decoded(plain, tokens, mask, 4)
    assert _rel(_decoded(fast, tokens, mask, 4), want) < REL


def test_an_in_place_hook_on_rotated_keys_is_applied_once_per_step():
    def double(k, hook):
        k.mul_(2)  # edits what it is given; returns nothing

    plain, fast = _pair()
    tokens, mask = _tokens(pos=10), _left_padded_mask(pos=10)
    hooks = [("blocks.0.attn.hook_rot_k", double)]
    want = _decoded(plain, tokens, mask, 5, hooks)
    assert _rel(_decoded(fast, tokens, mask, 5, hooks), want) < REL
    assert _rel(_decoded(plain, tokens, mask, 5), want) > 1e-3  # the hook matters


@pytest.mark.parametrize("name", ["hook_q", "hook_k", "hook_v"])
def test_query_key_value_hooks_get_contiguous_tensors(pair, name):
    plain, fast = pair
    seen = []

    def flatten(x, hook):
        seen.append(x.is_contiguous())
        return x.view(*x.shape[:2], -1).view(x.shape) * 1.5  # .view needs contiguity

    tokens = _tokens(pos=12)  # 36 rows: the per-head product on the fast path
    hooks = [(f"blocks.0.attn.{name}", flatten)]
    want = plain.run_with_hooks(tokens, fwd_hooks=hooks)
    got = fast.run_with_hooks(tokens, fwd_hooks=hooks)
    assert all(seen) and _rel(got, want) < REL


def test_a_method_replaced_on_one_layer_is_used_on_every_input_size(pair):
    plain, fast = pair
    outputs = {}
    for label, model in (("plain", plain), ("fast", fast)):
        attn = model.blocks[0].attn
        original = attn.calculate_qkv_matrices

        def clipped(*args, _original=original, **kwargs):
            q, k, v = _original(*args, **kwargs)
            return q.clamp(-0.05, 0.05), k, v

        attn.calculate_qkv_matrices = clipped
        try:
            outputs[label] = [model(_tokens(pos=pos)) for pos in (12, 50)]  # short and long
        finally:
            del attn.calculate_qkv_matrices
    for got, want in zip(outputs["fast"], outputs["plain"], strict=True):
        assert _rel(got, want) < REL
    assert _rel(plain(_tokens(pos=12)), outputs["plain"][0]) > 1e-3  # the override mattered


def _same_route_checks(model, tokens, hook="blocks.1.hook_resid_post"):
    read = {}

    def keep(x, hook):
        read["x"] = x.detach().clone()

    with torch.no_grad():
        plain_logits = model(tokens)
        cached_logits, cache = model.run_with_cache(tokens)
        model.run_with_hooks(tokens, fwd_hooks=[(hook, keep)])
    assert torch.equal(cached_logits, plain_logits)
    assert torch.equal(cache[hook], read["x"])
    return cache


def test_run_with_cache_takes_the_forward_route(pair):
    # Caching every hook (attention pattern and ln1 included) must not switch the model to
    # another route: the logits are bit-identical to a plain forward's, and so is a cached
    # activation to the one a hook reads; the pattern matches TransformerLens's own.
    plain, fast = pair
    tokens = _tokens(pos=12)
    cache = _same_route_checks(fast, tokens)
    _, want = plain.run_with_cache(tokens)
    assert _rel(cache["blocks.0.attn.hook_pattern"], want["blocks.0.attn.hook_pattern"]) < REL
    with torch.no_grad():  # clean activations patched into a clean run change nothing
        patched = fast.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: cache[hook.name])]
        )
    assert torch.equal(patched, fast(tokens))
    _same_route_checks(tiny(), torch.tensor([[5, 17, 300, 42, 7, 9]]))


@pytest.mark.slow
def test_run_with_cache_takes_the_forward_route_on_the_embedded_model(embedded_model):
    tokens = embedded_model.to_tokens(["The capital of France is", "Two plus two equals four."])
    _same_route_checks(embedded_model, tokens, "blocks.12.hook_resid_post")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"rotary_dim": 8}, {"rotary_adjacent_pairs": True}],
    ids=["full", "partial", "adjacent-pairs"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "left-padded"])
@pytest.mark.parametrize("offset", [0, 3])
def test_rotary_gives_transformer_lens_bits(kwargs, masked, offset):
    """The fast path's rotary (fewer copies) is TransformerLens's apply_rotary to the bit,
    forward and backward, with and without a mask and a cache offset."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from caft_tl.fast import _rotary

    cfg = dict(n_layers=1, d_model=64, n_heads=4, d_head=16, d_mlp=64, n_ctx=32, d_vocab=50,
               act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
               rotary_dim=16, gated_mlp=True, original_architecture="LlamaForCausalLM")  # fmt: skip
    attn = HookedTransformer(HookedTransformerConfig(**{**cfg, **kwargs})).blocks[0].attn
    x = torch.randn(3, 9, 4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = _left_padded_mask(3, 9 + offset) if masked else None
    grad = torch.randn(3, 9, 4, 16)
    want = attn.apply_rotary(x, offset, mask)
    got = _rotary(attn, x, offset, mask)
    assert torch.equal(got, want)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0])


# ------------------------------------------------ the embedding lookup


def _embed_pair(d_vocab: int, d_model: int):
    """TransformerLens's ``Embed`` with random weights and an accelerated copy."""
    cfg = copy.copy(tiny(tokenizer=None, fast=False).cfg)  # Embed reads only these two sizes
    cfg.d_vocab, cfg.d_model = d_vocab, d_model
    plain = Embed(cfg)
    torch.nn.init.normal_(plain.W_E)
    return plain, accelerate(copy.deepcopy(plain))


def test_embedding_gradient_is_the_same_on_every_backward(two_threads):
    # TransformerLens's W_E[tokens] backward adds repeated tokens' gradients with atomic adds
    # on CPU: with two threads and the embedded model's sizes they land in a different order
    # on each backward. A seeded fine-tune must repeat itself bit for bit.
    plain, fast = _embed_pair(49152, 576)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (8, 64), generator=g)  # many repeats, as in real text
    upstream = torch.randn(8, 64, 576, generator=g)
    grads = [_embedding_grad(fast, tokens, upstream) for _ in range(4)]
    reference = _embedding_grad(plain, tokens, upstream)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    torch.testing.assert_close(grads[0], reference, rtol=1e-5, atol=1e-5)


def _embedding_grad(module, tokens, upstream):
    module.W_E.grad = None
    module(tokens).backward(upstream)
    return module.W_E.grad


def test_embedding_takes_the_tokens_transformer_lens_takes():
    plain, fast = _embed_pair(50, 16)
    for tokens in (
        torch.tensor([[1, 49, 0]]),
        torch.tensor([[-1, -50, 3]]),  # negative ids count from the end, as in indexing
        torch.tensor([[7, 8]], dtype=torch.int32),
        torch.tensor([4, 5]),  # any shape
    ):
        assert torch.equal(fast(tokens), plain(tokens)), tokens
    for bad in (torch.tensor([[50]]), torch.tensor([[-51]])):
        with pytest.raises(IndexError):
            plain(bad)
        with pytest.raises(IndexError):
            fast(bad)
