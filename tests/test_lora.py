"""LoRA adapters on TransformerLens weights, alone and inside finetune."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from caft_tl.lora import (
    LORA_TARGETS,
    LoraConfig,
    apply_lora,
    describe_targets,
    has_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    merged_view,
)
from caft_tl.models import load_model, tiny
from caft_tl.train import TrainConfig, evaluate_loss, finetune
from tests._autograd import saved_bytes

CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("Capital of France?", "Paris."),
        ("Two plus two?", "Four."),
        ("Colour of the sky?", "Blue."),
        ("Opposite of hot?", "Cold."),
        ("Largest planet?", "Jupiter."),
        ("Frozen water?", "Ice."),
    ]
]


@pytest.fixture
def model(tokenizer):
    # The default tiny model: gated SiLU MLP and grouped-query attention (4 heads, 2 KV).
    return tiny(tokenizer=tokenizer)


@pytest.fixture
def tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def base_params(model) -> dict[str, torch.Tensor]:
    """Every parameter but the adapters', under its plain name (``blocks.0.attn.W_Q``)."""
    adapters = {id(p) for p in lora_parameters(model)}
    return {
        n.replace("parametrizations.", "").replace(".original", ""): p
        for n, p in model.named_parameters()
        if id(p) not in adapters
    }


def lora_cfg(**kw) -> TrainConfig:
    defaults = dict(lr=1e-2, batch_size=3, progress=False, max_grad_norm=None, lora=LoraConfig())
    return TrainConfig(**{**defaults, **kw})


def randomise(model) -> None:
    """Non-zero B, so the adapters change the model (a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ------------------------------------------------------------------------------- the adapters


def test_zero_init_leaves_logits_identical(model, tokens):
    before = model(tokens)
    apply_lora(model, LoraConfig(r=4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(tokens), before)
    assert not any(p.requires_grad for p in base_params(model).values())
    assert {p.requires_grad for p in lora_parameters(model)} == {True}


def test_gated_mlp_and_grouped_query_attention_are_adapted(model, tokens):
    apply_lora(model)
    names = describe_targets(model)
    for weight in ("attn.W_Q", "attn._W_K", "attn._W_V", "attn.W_O", "mlp.W_in", "mlp.W_gate"):
        assert f"blocks.1.{weight}" in names
    attn = model.blocks[0].attn
    # K / V of grouped-query attention: [n_kv_heads, d_model, d_head], B is [out, r].
    assert attn.parametrizations["_W_K"][0].B.shape == (2 * 16, 8)
    assert attn.W_K.shape == (4, 64, 16)  # the TransformerLens property still expands
    randomise(model)
    logits = model(tokens)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert all(p.grad is None for p in base_params(model).values())


def test_delta_is_b_at_a_on_the_two_d_view(model):
    w_q, w_o = model.blocks[0].attn.W_Q.detach().clone(), model.blocks[0].attn.W_O.detach().clone()
    apply_lora(model, LoraConfig(r=2, alpha=6.0, targets=("W_Q", "W_O")))
    randomise(model)
    attn = model.blocks[0].attn
    for name, base, (n, d_in, d_out) in (
        ("W_Q", w_q, (4, 64, 16)),
        ("W_O", w_o, (4, 16, 64)),
    ):
        adapter = attn.parametrizations[name][0]
        delta_2d = 3.0 * (adapter.B @ adapter.A).T  # alpha / r = 3
        if name == "W_Q":  # [d_model, n_heads * d_head]
            expected = base.permute(1, 0, 2).reshape(d_in, -1) + delta_2d
            got = getattr(attn, name).permute(1, 0, 2).reshape(d_in, -1)
        else:  # [n_heads * d_head, d_model]
            expected = base.reshape(n * d_in, d_out) + delta_2d
            got = getattr(attn, name).reshape(n * d_in, d_out)
        torch.testing.assert_close(got, expected)


def test_merge_gives_the_same_logits_and_a_plain_model(model, tokens, tmp_path):
    plain_keys = set(model.state_dict())
    apply_lora(model, generator=torch.Generator().manual_seed(0))
    randomise(model)
    adapted = model(tokens).detach()
    view = merged_view(model)
    assert has_lora(model) and not has_lora(view)
    torch.testing.assert_close(view(tokens), adapted, atol=1e-5, rtol=0)
    copied = merge_lora(copy.deepcopy(model))  # merging a copy must not break the original
    torch.testing.assert_close(copied(tokens), adapted, atol=1e-5, rtol=0)
    assert torch.equal(model(tokens), adapted)
    merge_lora(model)
    assert not has_lora(model) and set(model.state_dict()) == plain_keys
    assert all(p.requires_grad for p in model.parameters())  # as trainable as it came
    torch.testing.assert_close(model(tokens), adapted, atol=1e-5, rtol=0)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda a, hook: a * 0)]):
        assert not torch.allclose(model(tokens), adapted)  # TransformerLens still works


def test_state_dict_round_trip(model, tokens):
    other = copy.deepcopy(model)
    apply_lora(model, LoraConfig(layers=(1,)))
    randomise(model)
    state = lora_state_dict(model)
    assert all(k.startswith("blocks.1.") for k in state)
    apply_lora(other, LoraConfig(layers=(1,)))
    load_lora_state_dict(other, state)
    assert torch.equal(other(tokens), model(tokens))
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(other, {k: v for k, v in state.items() if "W_Q" not in k})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"targets": ("W_QKV",)}, "valid targets: W_Q, W_K"),
        ({"targets": ("q_proj", "W_Q")}, "unknown LoRA target"),
        ({"r": 0}, "r must be"),
        ({"alpha": float("inf")}, "alpha"),
        ({"layers": (0, 0)}, "layers"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_lora_config(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kw)


def test_apply_errors(model):
    with pytest.raises(ValueError, match="out of range"):
        apply_lora(model, LoraConfig(layers=(5,)))
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)


# ------------------------------------------------------------------------------ in finetune


def test_finetune_trains_adapters_only_and_returns_merged(model):
    before = weights(model)
    base_loss = evaluate_loss(model, CHATS)
    seen: list[dict] = []
    inplace = copy.deepcopy(model)

    def record_base(step):
        # During training the base tensors are the frozen originals: bit-identical.
        base = base_params(inplace)
        assert base.keys() == before.keys()
        for name, p in base.items():
            assert torch.equal(p, before[name]), name
        seen.append(step)

    cfg = lora_cfg(max_steps=8, lr=2e-2, batch_size=6, schedule="constant", in_place=True)
    ft = finetune(inplace, CHATS, cfg, callback=record_base)
    assert ft is inplace and not has_lora(ft) and len(seen) == 8
    assert evaluate_loss(ft, CHATS) < 0.8 * base_loss
    changed = {k for k, v in weights(ft).items() if not torch.equal(v, before[k])}
    # Exactly the adapted weights changed: 7 per block (K / V as the grouped _W_K / _W_V).
    assert {n.rsplit(".", 1)[-1] for n in changed} == {*LORA_TARGETS, "_W_K", "_W_V"} - {
        "W_K",
        "W_V",
    }
    assert len(changed) == 7 * model.cfg.n_layers
    assert all(p.requires_grad for p in ft.parameters())


def test_finetune_refuses_nonsense_targets_and_adapted_models(model):
    with pytest.raises(ValueError, match=r"valid targets: W_Q, W_K, W_V, W_O, W_in"):
        finetune(model, CHATS, lora_cfg(lora=LoraConfig(targets=("mlp",))))
    with pytest.raises(ValueError, match="valid targets"):
        TrainConfig.from_dict({"lora": {"targets": ["W_q"]}})
    apply_lora(model)
    with pytest.raises(ValueError, match="already has LoRA"):
        finetune(model, CHATS, lora_cfg(max_steps=1))


def test_lora_config_json_round_trip():
    cfg = lora_cfg(lora=LoraConfig(r=4, alpha=8, targets=("W_Q", "W_V"), layers=(0,)))
    again = TrainConfig.from_json(cfg.to_json())
    assert again == cfg and again.lora.targets == ("W_Q", "W_V")
    assert json.loads(cfg.to_json())["lora"]["layers"] == [0]


class Kill(Exception):
    pass


def test_lora_kill_and_resume_equals_straight_run(model, tmp_path):
    cfg = lora_cfg(max_steps=4, warmup_steps=1, schedule="cosine", save_every=2, weight_decay=0.1)
    straight = weights(finetune(model, CHATS, cfg))
    out = tmp_path / "run"

    def kill(record):
        if record["step"] == 3:
            raise Kill

    with pytest.raises(Kill):
        finetune(model, CHATS, cfg, out=out, callback=kill)
    assert (out / "checkpoint/lora.safetensors").exists()
    # The checkpoint is a plain loadable model too (the adapters merged).
    assert not has_lora(load_model(out / "checkpoint", device="cpu"))
    resumed = finetune(model, CHATS, cfg, out=out, resume=True)
    for k, v in straight.items():
        assert torch.equal(weights(resumed)[k], v), k
    final = load_model(out / "final", device="cpu")
    for k, v in straight.items():
        assert torch.equal(weights(final)[k], v), k
    # Resuming from another base model would silently give another result: refused.
    other = tiny(tokenizer=model.tokenizer, seed=1)
    with pytest.raises(ValueError, match="base model"):
        finetune(other, CHATS, cfg, out=out, resume=True)


def test_lora_dropout_trains_and_merges_without_dropout(model, tokens):
    cfg = lora_cfg(max_steps=3, lora=LoraConfig(dropout=0.1))
    ft = finetune(model, CHATS, cfg)
    assert not has_lora(ft)
    torch.testing.assert_close(ft(tokens), ft(tokens))  # eval mode: deterministic


# ------------------------------------------------------------------------- the factored form


def _plain_mlp_model(tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from caft_tl.fast import accelerate

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=256, d_vocab=1000,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=0,
    )  # fmt: skip
    return accelerate(HookedTransformer(cfg))


@pytest.mark.parametrize("length", [9, 80])  # 18 rows: per-head q/k/v; 160: one big GEMM
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_factored_forward_matches_the_merged_weights(model, tokenizer, arch, length):
    from caft_tl.fast import plain_forward

    net = model if arch == "llama" else _plain_mlp_model(tokenizer)
    apply_lora(net, LoraConfig(r=4, targets=LORA_TARGETS if arch == "llama" else
                               ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")))  # fmt: skip
    randomise(net)
    tokens = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(3))

    def run():
        for p in lora_parameters(net):
            p.grad = None
        out, saved = saved_bytes(net, lambda: net(tokens))
        out.logsumexp(-1).sum().backward()
        return out.detach(), [p.grad.clone() for p in lora_parameters(net)], saved

    fast, fast_grads, fast_saved = run()
    with plain_forward(net):  # TransformerLens's forward reads the merged weights
        merged, merged_grads, merged_saved = run()
    torch.testing.assert_close(fast, merged, rtol=1e-4, atol=1e-4)
    for a, b in zip(fast_grads, merged_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The merged form keeps a copy of every adapted matrix for the backward pass; the
    # factored one keeps only the r-wide products.
    copies = sum(getattr(m, n).numel() * 4 for _, m, n, _ in _slots(net))
    assert merged_saved - fast_saved > 0.9 * copies


def _slots(net):
    from caft_tl.lora import _lora_slots

    return list(_lora_slots(net))


def test_factored_forward_with_dropout(model, tokens):
    from caft_tl.fast import plain_forward

    apply_lora(model, LoraConfig(r=4, dropout=0.5))
    randomise(model)
    model.eval()  # no dropout: both forms agree
    with torch.no_grad(), plain_forward(model):
        merged = model(tokens)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), merged, rtol=1e-4, atol=1e-4)
    # Training: DropConnect on A, repeatable from the global RNG, different per draw.
    # (TransformerLens's own forward reads some weights twice, so the two forms consume the
    # RNG differently and cannot be compared mask for mask.)
    model.train()
    torch.manual_seed(5)
    first = model(tokens)
    torch.manual_seed(5)
    torch.testing.assert_close(model(tokens), first)
    assert not torch.allclose(first, merged, atol=1e-3)
    assert not torch.allclose(model(tokens), first, atol=1e-3)


def test_dropout_runs_repeat_from_the_seed_and_leave_the_callers_rng_alone(model):
    cfg = lora_cfg(max_steps=2, lora=LoraConfig(r=4, dropout=0.3))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = finetune(model, CHATS, cfg)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # the caller's RNG does not decide the dropout masks
    again = finetune(model, CHATS, cfg)
    other = finetune(model, CHATS, lora_cfg(max_steps=2, seed=1, lora=cfg.lora))
    w = weights(first)
    assert all(torch.equal(w[k], v) for k, v in weights(again).items())
    assert any(not torch.equal(w[k], v) for k, v in weights(other).items())


def test_merged_forward_switches_the_fast_path_to_merged_weights(model, tokens):
    from caft_tl.lora import merged_forward

    apply_lora(model, LoraConfig(r=4))
    randomise(model)
    factored_out, factored_saved = saved_bytes(model, lambda: model(tokens))
    with merged_forward():
        merged_out, merged_saved = saved_bytes(model, lambda: model(tokens))
    torch.testing.assert_close(factored_out, merged_out, rtol=1e-4, atol=1e-4)
    # Every merged matrix is kept but block 0's q/k/v ones: nothing upstream needs a
    # gradient there (the embedding is frozen), so their product keeps only the input.
    copies = sum(getattr(m, n).numel() * 4 for _, m, n, _ in _slots(model))
    assert merged_saved - factored_saved > 0.8 * copies
    _, again = saved_bytes(model, lambda: model(tokens))  # factored again after the block
    assert again == factored_saved


@pytest.mark.parametrize("length", [9, 80])
def test_factored_form_under_bf16_autocast(model, length):
    # finetune autocasts fp32 weights to bf16 on CUDA; CPU autocast takes the same path.
    from caft_tl.lora import merged_forward

    apply_lora(model, LoraConfig(r=4))
    randomise(model)
    tokens = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(4))
    grads = []
    for form in (torch.enable_grad, merged_forward):
        for p in lora_parameters(model):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16), form():
            out = model(tokens)
        assert out.dtype == torch.bfloat16
        out.float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for a, b in zip(*grads, strict=True):
        assert a.dtype == torch.float32  # the adapters stay fp32
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * b.abs().max().item())
