"""The fine-tuning memory estimator against real models: parameter counts, gradient and
AdamW state sizes exactly; activations only as a plausible order of magnitude."""

from __future__ import annotations

import pytest
import torch

import caft_tl as ct
from caft_tl.lora import apply_lora, lora_parameters
from caft_tl.memory import count_parameters, estimate_finetune_memory
from caft_tl.models import tie_embeddings, tiny


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
    apply_lora(model, lora)
    assert est.n_trainable == sum(p.numel() for p in lora_parameters(model))
    block = model.blocks[1]
    targeted = [block.attn.W_Q, block.attn._W_V, block.mlp.W_in]  # grouped: V's own width
    assert est.lora_merged == _nbytes(targeted)
    assert est.optimizer == 2 * est.gradients == 2 * 4 * est.n_trainable


def test_estimates_scale_as_they_should():
    cfg = tiny(tokenizer=None).cfg
    one = estimate_finetune_memory(cfg, batch_size=1, seq_len=64)
    four = estimate_finetune_memory(cfg, batch_size=4, seq_len=64)
    assert four.activations == 4 * one.activations and four.logits == 4 * one.logits
    assert four.weights == one.weights
    bf16 = estimate_finetune_memory(cfg, batch_size=1, seq_len=64, dtype="bfloat16")
    assert bf16.weights * 2 == one.weights
    assert "weights" in one.table() and one.total > one.weights


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


def test_paper_scale_plan_is_computable():
    # Qwen2.5-Coder-32B-Instruct's shape (HF config.json): LoRA on a bf16 base, as in the docs.
    qwen32b = {
        "d_model": 5120, "n_layers": 64, "n_heads": 40, "d_head": 128,
        "n_key_value_heads": 8, "d_mlp": 27648, "d_vocab": 152064, "gated_mlp": True,
    }  # fmt: skip
    n = count_parameters(qwen32b)
    assert 32.5e9 < n < 33.0e9  # HF: 32.76B (without TransformerLens's zero biases)
    est = estimate_finetune_memory(
        qwen32b, batch_size=1, seq_len=1024, dtype="bfloat16", lora=ct.LoraConfig(r=32)
    )
    assert 60 < est.weights / 2**30 < 62


@pytest.mark.slow
def test_embedded_model_count(embedded_model):
    assert count_parameters(embedded_model.cfg) == sum(
        p.numel() for p in embedded_model.parameters()
    )
