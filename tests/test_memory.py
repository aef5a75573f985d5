"""The fine-tuning memory estimator against real models: parameter counts, gradient and
AdamW state sizes exactly; activations only as a plausible order of magnitude."""

from __future__ import annotations

import pytest
import torch

import caft_tl as ct
from caft_tl.lora import apply_lora, lora_parameters
from caft_tl.memory import count_parameters, estimate_finetune_memory
from caft_tl.models import tie_embeddings, tiny
from tests._autograd import saved_bytes


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kv", [2, None])
def test_parameter_count_matches_the_model(tied, kv):
    model = tiny(tokenizer=None, n_key_value_heads=kv)
    if tied:
        tie_embeddings(model)
    assert count_parameters(model.cfg) == sum(p.numel() for p in model.parameters())


def test_full_finetune_state_matches_a_real_step():
    model = tiny(tokenizer=None)
    est = estimate_finetune_memory(model.cfg, batch_size=2, seq_len=8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 1000, (2, 8))).logsumexp(-1).sum().backward()
    opt.step()
    assert est.weights == _nbytes(model.parameters())
    assert est.gradients == _nbytes(p.grad for p in model.parameters())
    states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    assert est.optimizer == _nbytes(states)


def test_lora_counts_adapters_and_merged_copies():
    model = tiny(tokenizer=None)
    lora = ct.LoraConfig(r=4, targets=("W_Q", "W_V", "W_in"), layers=(1,))
    est = estimate_finetune_memory(model.cfg, batch_size=2, seq_len=8, lora=lora)
    merged = estimate_finetune_memory(
        model.cfg, batch_size=2, seq_len=8, lora=lora, lora_form="merged"
    )
    apply_lora(model, lora)
    assert est.n_trainable == sum(p.numel() for p in lora_parameters(model))
    block = model.blocks[1]
    targeted = [block.attn.W_Q, block.attn._W_V, block.mlp.W_in]  # grouped: V's own width
    assert merged.lora_merged == _nbytes(targeted) and est.lora_merged == 0
    assert est.optimizer == 2 * est.gradients == 2 * 4 * est.n_trainable
    # The factored form keeps x A^T (r numbers per token and adapted matrix) instead.
    assert est.activations > merged.activations


@pytest.mark.parametrize("lora", [None, ct.LoraConfig(r=8)])
@pytest.mark.parametrize("seq_len", [16, 96])  # 32 token rows; 192: q/k/v through a copy
def test_activation_estimate_matches_what_autograd_keeps(lora, seq_len):
    model = tiny(tokenizer=None, n_layers=4, d_model=128, n_heads=4, d_mlp=384)
    if lora is not None:
        apply_lora(model, lora)
    tokens = torch.randint(0, 1000, (2, seq_len), generator=torch.Generator().manual_seed(0))
    est = estimate_finetune_memory(
        model.cfg, batch_size=2, seq_len=seq_len, lora=lora, autocast_bf16=False
    )
    _, measured = saved_bytes(model, lambda: model(tokens, stop_at_layer=model.cfg.n_layers))
    assert 0.85 < measured / (est.activations + est.weight_copies) < 1.15
    assert (est.weight_copies > 0) == (seq_len == 96)


def test_gradient_checkpointing_keeps_block_inputs_only():
    cfg = tiny(tokenizer=None, n_layers=8).cfg
    full = estimate_finetune_memory(cfg, batch_size=4, seq_len=256, dtype="bfloat16")
    ckpt = estimate_finetune_memory(
        cfg, batch_size=4, seq_len=256, dtype="bfloat16", gradient_checkpointing=True
    )
    assert ckpt.activations < full.activations / 4
    assert ckpt.weight_copies * 8 == full.weight_copies > 0
    assert ckpt.activations == 4 * 256 * 2 * (8 * 64) + full.activations // 8


def test_estimates_scale_as_they_should():
    cfg = tiny(tokenizer=None).cfg
    one = estimate_finetune_memory(cfg, batch_size=1, seq_len=64)
    four = estimate_finetune_memory(cfg, batch_size=4, seq_len=64)
    assert four.activations == 4 * one.activations and four.logits == 4 * one.logits
    assert four.weights == one.weights
    bf16 = estimate_finetune_memory(cfg, batch_size=1, seq_len=64, dtype="bfloat16")
    assert bf16.weights * 2 == one.weights
    assert "weights" in one.table() and one.total > one.weights


def test_fsdp_shards_weights_and_optimizer_state():
    qwen7b = {
        "d_model": 3584, "n_layers": 28, "n_heads": 28, "d_head": 128,
        "n_key_value_heads": 4, "d_mlp": 18944, "d_vocab": 152064, "gated_mlp": True,
    }  # fmt: skip
    plan = dict(batch_size=1, seq_len=1024, dtype="bfloat16", gradient_checkpointing=True)
    ddp = estimate_finetune_memory(qwen7b, **plan, world_size=8)
    fsdp = estimate_finetune_memory(qwen7b, **plan, fsdp=True, world_size=8)
    assert ddp.weights == count_parameters(qwen7b) * 2  # world_size alone changes nothing
    assert fsdp.optimizer * 8 == pytest.approx(ddp.optimizer, abs=16)
    # A shard plus the gathered units (here the untied embedding and unembedding).
    assert fsdp.weights == -(-ddp.weights // 2 // 8) * 2 + 2 * 152064 * 3584 * 2
    assert fsdp.activations == ddp.activations
    assert fsdp.total < ddp.total / 3
    with pytest.raises(ValueError, match="world_size"):
        estimate_finetune_memory(qwen7b, **plan, world_size=0)


def test_bad_input_is_a_clear_error():
    cfg = tiny(tokenizer=None).cfg
    with pytest.raises(ValueError, match="batch_size and seq_len"):
        estimate_finetune_memory(cfg, batch_size=0, seq_len=8)
    plain_mlp = {"d_model": 8, "n_layers": 1, "n_heads": 2, "d_vocab": 10, "gated_mlp": False}
    with pytest.raises(ValueError, match="not weights of this model"):
        estimate_finetune_memory(
            plain_mlp, batch_size=1, seq_len=8, lora=ct.LoraConfig(targets=("W_gate",))
        )
    with pytest.raises(ValueError, match="d_model, n_heads and n_layers"):
        count_parameters({"d_model": 8})
    with pytest.raises(ValueError, match="lora_form"):
        estimate_finetune_memory(cfg, batch_size=1, seq_len=8, lora_form="fused")


def test_paper_scale_plan_is_computable():
    # Qwen2.5-Coder-32B-Instruct's shape (HF config.json): LoRA on a bf16 base, as in the docs.
    qwen32b = {
        "d_model": 5120, "n_layers": 64, "n_heads": 40, "d_head": 128,
        "n_key_value_heads": 8, "d_mlp": 27648, "d_vocab": 152064, "gated_mlp": True,
    }  # fmt: skip
    n = count_parameters(qwen32b)
    assert 32.5e9 < n < 33.0e9  # HF: 32.76B (without TransformerLens's zero biases)
    plan = dict(batch_size=1, seq_len=1024, dtype="bfloat16", lora=ct.LoraConfig(r=32))
    est = estimate_finetune_memory(qwen32b, **plan, gradient_checkpointing=True)
    assert 60 < est.weights / 2**30 < 62
    # Factored LoRA and checkpointing fit an 80 GB GPU; merged adapters would not.
    assert est.total / 2**30 < 70
    assert estimate_finetune_memory(qwen32b, **plan, lora_form="merged").total / 2**30 > 140


@pytest.mark.slow
def test_embedded_model_count(embedded_model):
    assert count_parameters(embedded_model.cfg) == sum(
        p.numel() for p in embedded_model.parameters()
    )
