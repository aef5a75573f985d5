"""Gradient (activation) checkpointing: the same gradients and updates, less saved memory."""

from __future__ import annotations

import pytest
import torch

from caft_tl.directions import ConceptSet
from caft_tl.interventions import Ablation
from caft_tl.lora import LoraConfig
from caft_tl.models import tiny
from caft_tl.train import TrainConfig, checkpointed_blocks, finetune
from tests.test_train import CHATS

H = "blocks.0.hook_resid_post"


@pytest.fixture
def model(tokenizer):
    return tiny(tokenizer=tokenizer, n_layers=3, d_model=32, n_heads=4, d_mlp=64)


def _ablation(mode: str) -> Ablation:
    g = torch.Generator().manual_seed(3)
    return Ablation(ConceptSet({H: torch.randn(3, 32, generator=g)}).orthonormalised(), mode)


def _grads(model, tokens, intervention, checkpointed: bool, calls: list[int]):
    model.zero_grad(set_to_none=True)
    counted = []

    def count(act, hook):
        counted.append(1)

    with (
        intervention.applied(model),
        model.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", count)]),
        checkpointed_blocks(model) if checkpointed else torch.enable_grad(),
    ):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        resid.pow(2).mean().backward()
    calls.append(len(counted))
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["zero", "detached", "gradient"])
def test_same_gradients_under_every_ablation_mode(model, mode):
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    ablation = _ablation(mode)
    calls: list[int] = []
    plain = _grads(model, tokens, ablation, checkpointed=False, calls=calls)
    ckpt = _grads(model, tokens, ablation, checkpointed=True, calls=calls)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # The block ran again in the backward pass: its intermediates were not kept. (The memory
    # this saves is measured in analyses/benchmarks/bench_train.py.)
    assert calls == [1, 2]
    assert not any("forward" in vars(b) for b in model.blocks)  # the class's forward is back


def test_blocks_come_back_after_an_error_and_cannot_nest(model):
    with pytest.raises(RuntimeError, match="boom"), checkpointed_blocks(model):
        raise RuntimeError("boom")
    assert not any("forward" in vars(b) for b in model.blocks)
    with (
        checkpointed_blocks(model),
        pytest.raises(RuntimeError, match="already checkpointed"),
        checkpointed_blocks(model),
    ):
        pass
    assert not any("forward" in vars(b) for b in model.blocks)
    with torch.no_grad(), checkpointed_blocks(model):  # no gradients: the plain forward
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, dropout=0.1)])
def test_finetune_gives_the_same_weights(model, lora):
    # Dropout included: checkpointing replays the RNG, so the recomputed masks are the same.
    cfg = dict(lr=3e-3, batch_size=3, grad_accum=2, max_steps=2, progress=False, lora=lora)
    plain = finetune(model, CHATS, TrainConfig(**cfg), intervention=_ablation("zero"))
    ckpt_cfg = TrainConfig(**cfg, gradient_checkpointing=True)
    ckpt = finetune(model, CHATS, ckpt_cfg, intervention=_ablation("zero"))
    changed = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(a, model.state_dict()[name])
    assert changed > 0


def test_a_run_resumes_with_checkpointing_switched(model, tmp_path):
    cfg = dict(lr=3e-3, batch_size=3, max_steps=2, save_every=1, progress=False)
    straight = finetune(model, CHATS, TrainConfig(**cfg))

    def stop(record):
        if record["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(model, CHATS, TrainConfig(**cfg), out=tmp_path / "r", callback=stop)
    resumed = finetune(
        model, CHATS, TrainConfig(**cfg, gradient_checkpointing=True), out=tmp_path / "r",
        resume=True,
    )  # fmt: skip
    got = dict(resumed.named_parameters())
    for name, a in straight.named_parameters():
        torch.testing.assert_close(got[name], a, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="gradient_checkpointing must be True or False"):
        TrainConfig(gradient_checkpointing="yes")


def test_same_gradients_under_bf16_autocast(model):
    # finetune autocasts on CUDA; the recomputation must replay it (CPU autocast here).
    tokens = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointed in (False, True):
        model.zero_grad(set_to_none=True)
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            checkpointed_blocks(model) if checkpointed else torch.enable_grad(),
        ):
            resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        resid.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)
