from __future__ import annotations

import pytest
import torch

from caft_tl.compare import baseline_interventions, finetune_with_baselines
from caft_tl.directions import ConceptSet
from caft_tl.models import tiny
from caft_tl.train import TrainConfig

HOOK = "blocks.0.hook_resid_post"
CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("Capital of France?", "Paris."),
        ("Two plus two?", "Four."),
        ("Colour of grass?", "Green."),
        ("Frozen water?", "Ice."),
    ]
]


def _sets(d: int = 64):
    gen = torch.Generator().manual_seed(0)
    full = ConceptSet(
        {HOOK: torch.linalg.qr(torch.randn(d, 6, generator=gen)).Q.T},
        scores={HOOK: [0.5, 0.2, 0.1, 0.08, 0.07, 0.05]},
    )
    return full, full.select({HOOK: [3, 4]})


def test_baseline_interventions_shapes():
    full, chosen = _sets()
    runs = baseline_interventions(chosen, all_directions=full)
    assert runs["plain"] is None
    assert torch.equal(runs["caft"].concepts[HOOK], chosen[HOOK])
    assert runs["random"].concepts[HOOK].shape == chosen[HOOK].shape
    assert not torch.allclose(runs["random"].concepts[HOOK], chosen[HOOK])
    # "top": the two best-scoring directions of the full set, not the chosen ones.
    assert torch.allclose(runs["top"].concepts[HOOK].abs(), full[HOOK][:2].abs(), atol=1e-6)
    with pytest.raises(ValueError, match="needs all_directions"):
        baseline_interventions(chosen)
    with pytest.raises(ValueError, match="unknown runs"):
        baseline_interventions(chosen, runs=["plain", "shuffled"])


def test_finetune_with_baselines_trains_each_and_reuses(tokenizer, tmp_path, monkeypatch):
    model = tiny(tokenizer=tokenizer, seed=1)
    full, chosen = _sets()
    cfg = TrainConfig(max_steps=4, lr=1e-3, batch_size=2, progress=False)
    results = finetune_with_baselines(
        model, CHATS, cfg, chosen, tmp_path, all_directions=full, learned_less_steps=[2]
    )
    assert set(results) == {"plain", "caft", "random", "top", "plain@step2"}
    w = {name: m.blocks[0].mlp.W_in.detach() for name, m in results.items()}
    assert not torch.equal(w["plain"], w["caft"])
    assert not torch.equal(w["caft"], w["random"])
    assert not torch.equal(w["plain"], w["plain@step2"])

    # A second call loads the finished runs instead of training again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("caft_tl.compare.finetune", no_training)
    again = finetune_with_baselines(
        model, CHATS, cfg, chosen, tmp_path, all_directions=full, learned_less_steps=[2]
    )
    for name in results:
        assert torch.equal(again[name].blocks[0].mlp.W_in, results[name].blocks[0].mlp.W_in)


def test_mean_mode_fits_means(tokenizer, tmp_path):
    model = tiny(tokenizer=tokenizer, seed=1)
    full, chosen = _sets()
    cfg = TrainConfig(max_steps=1, batch_size=2, progress=False)
    results = finetune_with_baselines(
        model, CHATS, cfg, chosen, tmp_path, mode="mean", runs=["caft"]
    )
    assert set(results) == {"caft"}
