"""Differential tests: every way of running a model, fast paths on against off, on small
configurations covering the architecture features ``load_model`` supports.

Each cell builds a plain ``HookedTransformer`` and an accelerated deep copy with the same
weights and compares what a TransformerLens user gets from both. Tolerances: 1e-5 relative
in float32 (attention through scaled-dot-product accumulates in another order), 1e-10 in
float64, 2e-2 in bfloat16, above an absolute floor for quantities that are zero up to
rounding (:data:`ATOL`).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from caft_tl.fast import accelerate
from caft_tl.lora import LoraConfig, apply_lora
from caft_tl.models import tie_embeddings

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2}
# Below these a difference is rounding noise on a quantity that is mathematically zero (the
# key bias's gradient: softmax ignores a shift shared by every key).
ATOL = {torch.float32: 1e-7, torch.float64: 1e-13, torch.bfloat16: 1e-3}
VOCAB = 97


def _base(**overrides) -> dict:
    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_mlp=64, n_ctx=64,
        d_vocab=VOCAB, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=8, rotary_base=10000.0, final_rms=True,
        gated_mlp=True, original_architecture="LlamaForCausalLM", default_prepend_bos=False,
        seed=0,
    )  # fmt: skip
    return {**cfg, **overrides}


ARCHITECTURES = {
    "llama-gqa": _base(),
    "mha-partial-rotary": _base(n_key_value_heads=None, rotary_dim=4),
    "dynamic-ntk": _base(use_dynamic_ntk_rope=True, train_seq_length=6),
    "gpt2-layernorm-ungated": _base(
        n_key_value_heads=None,
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        final_rms=False,
        gated_mlp=False,
        original_architecture="GPT2LMHeadModel",
        rotary_dim=None,
    ),  # fmt: skip
    "softcap": _base(attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0),
    "gemma2-style": _base(
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=5.0,
        output_logits_soft_cap=3.0,
        attn_types=["global", "local"],
        window_size=4,
        act_fn="gelu_pytorch_tanh",
        original_architecture="Gemma2ForCausalLM",
    ),  # fmt: skip
    "tied-unembed": _base(),
}


def make_pair(arch: str, dtype: torch.dtype = torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(**ARCHITECTURES[arch], dtype=dtype)
        plain = HookedTransformer(cfg).eval()
    if arch == "tied-unembed":
        tie_embeddings(plain)
    with torch.no_grad():  # random norm weights, so a wrong normalisation shows
        for name, p in plain.named_parameters():
            if name.endswith((".w", ".w_in")) or name.endswith("ln_final.w"):
                p.add_(0.2 * torch.randn_like(p))
    return plain, accelerate(copy.deepcopy(plain))


def close(got, want, dtype=torch.float32) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want)
        for key in want:
            try:
                close(got[key], want[key], dtype)
            except AssertionError as e:
                raise AssertionError(f"{key}: {e}") from None
        return
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            close(g, w, dtype)
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    if not want.is_floating_point():
        assert torch.equal(got, want)
        return
    same_inf = torch.isinf(want) & (got == want)
    g, w = got.masked_fill(same_inf, 0).double(), want.masked_fill(same_inf, 0).double()
    excess = (g - w).abs() - ATOL[dtype]
    assert (excess.max() / w.abs().max().clamp_min(1e-30)).item() <= TOL[dtype]


def tokens(batch=3, pos=9, seed=0):
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def left_mask(batch=3, pos=9):
    mask = torch.ones(batch, pos, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return mask


# ------------------------------------------------------------------- ways of running


def forward(model):
    return model(tokens())


def forward_left_padded(model):
    return model(tokens(), attention_mask=left_mask())


def forward_right_padded(model):
    return model(tokens(), attention_mask=left_mask().flip(-1))


def cache_everything(model):
    logits, cache = model.run_with_cache(tokens())
    return {"logits": logits, **dict(cache.items())}


def cache_filtered(model):
    logits, cache = model.run_with_cache(tokens(), names_filter=lambda n: "resid_post" in n)
    return {"logits": logits, **dict(cache.items())}


EDITED = [
    "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
    "blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.0.attn.hook_attn_scores",
    "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.ln1.hook_normalized",
    "blocks.1.hook_resid_mid", "blocks.0.mlp.hook_post", "unembed.hook_in",
]  # fmt: skip


def _present(model, names):
    return [n for n in names if n in model.hook_dict]


def read_every_hook(model):
    seen = {}

    def read(x, hook):
        seen[f"{hook.name}#{len(seen)}"] = x.detach().clone()

    logits = model.run_with_hooks(tokens(), fwd_hooks=[(lambda n: True, read)])
    # Order of firing may differ (ln1 fires once on the fast path); compare by name, last.
    last = {name.split("#")[0]: x for name, x in seen.items()}
    return {"logits": logits, **last}


def returning_hooks(model):
    hooks = [(n, lambda x, hook: x * 0.7) for n in _present(model, EDITED)]
    return model.run_with_hooks(tokens(), fwd_hooks=hooks, attention_mask=left_mask())


def in_place_hooks(model):
    def scale(x, hook):
        x.mul_(0.7)

    hooks = [(n, scale) for n in _present(model, EDITED)]
    return model.run_with_hooks(tokens(), fwd_hooks=hooks, attention_mask=left_mask())


def start_and_stop(model):
    resid = model(tokens(), stop_at_layer=1)
    return {"resid": resid, "logits": model(resid, start_at_layer=1)}


def generate_with_cache(model):
    return model.generate(
        tokens(batch=2, pos=5), max_new_tokens=4, do_sample=False, use_past_kv_cache=True,
        verbose=False, stop_at_eos=False,
    )  # fmt: skip


def generate_without_cache(model):
    return model.generate(
        tokens(batch=2, pos=5), max_new_tokens=4, do_sample=False, use_past_kv_cache=False,
        verbose=False, stop_at_eos=False,
    )  # fmt: skip


def _manual_decoding(model):
    toks, mask = tokens(pos=9), left_mask(pos=9)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(toks))
    out = [model(toks[:, :5], attention_mask=mask[:, :5], past_kv_cache=cache)]
    for t in range(5, 9):
        out.append(
            model(toks[:, t : t + 1], attention_mask=mask[:, t : t + 1], past_kv_cache=cache)
        )
    return torch.cat(out, dim=1)


def decode_no_grad(model):
    with torch.no_grad():
        return _manual_decoding(model)


def decode_with_grad(model):
    logits = _manual_decoding(model)
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"logits": logits.detach(), **grads}


def backward(model):
    loss = model(tokens(), return_type="loss", attention_mask=left_mask().flip(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), **grads}


WAYS = {
    f.__name__: f
    for f in (
        forward, forward_left_padded, forward_right_padded, cache_everything, cache_filtered,
        read_every_hook, returning_hooks, in_place_hooks, start_and_stop, generate_with_cache,
        generate_without_cache, decode_no_grad, decode_with_grad, backward,
    )
}  # fmt: skip
NO_GRAD = {"generate_with_cache", "generate_without_cache", "decode_no_grad"}


def _run(model, way):
    if way in NO_GRAD or way == "decode_with_grad" or way == "backward":
        return WAYS[way](model)
    with torch.no_grad():
        return WAYS[way](model)


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fast_equals_plain(arch, way):
    plain, fast = make_pair(arch)
    close(_run(fast, way), _run(plain, way))


@pytest.mark.parametrize("way", ["forward_left_padded", "backward", "decode_no_grad"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2-layernorm-ungated", "dynamic-ntk"])
def test_fast_equals_plain_in_float64(arch, way):
    plain, fast = make_pair(arch, torch.float64)
    close(_run(fast, way), _run(plain, way), torch.float64)


@pytest.mark.parametrize("way", ["forward_left_padded", "backward", "returning_hooks"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2-layernorm-ungated"])
def test_fast_equals_plain_with_lora(arch, way):
    plain, fast = make_pair(arch)
    lora = LoraConfig(r=2, alpha=4, targets=("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"))
    for model in (plain, fast):
        apply_lora(model, lora, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # B starts at zero: give the adapters something to add
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    close(_run(fast, way), _run(plain, way))


@pytest.mark.parametrize("way", ["forward_left_padded", "decode_no_grad"])
def test_fast_equals_plain_in_bfloat16(way):
    plain, fast = make_pair("llama-gqa", torch.bfloat16)
    close(_run(fast, way), _run(plain, way), torch.bfloat16)


@pytest.mark.parametrize("in_place", [False, True], ids=["returning", "in-place"])
@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2-layernorm-ungated", "gemma2-style"])
def test_an_edit_at_any_single_hook_point_has_the_same_effect(arch, in_place):
    plain, fast = make_pair(arch)

    def edit(x, hook):
        if in_place:
            x.mul_(0.7)
            return None
        return x * 0.7

    toks, mask = tokens(), left_mask()
    with torch.no_grad():
        for name in plain.hook_dict:
            runs = [
                m.run_with_hooks(toks, attention_mask=mask, fwd_hooks=[(name, edit)])
                for m in (fast, plain)
            ]
            try:
                close(*runs)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
