"""`caft-tl directions` on the embedded SmolLM2-135M-Instruct: a real fine-tune's checkpoint
folders in, a 576-wide ConceptSet out (the tiny-model version is test_cli_directions.py)."""

from __future__ import annotations

import json

import pytest
import torch

import caft_tl as ct
from caft_tl.cli import main
from caft_tl.directions import ConceptSet

HOOK = "blocks.15.hook_resid_post"
JOBS = [("nurse", "She", "her"), ("engineer", "He", "his"), ("nanny", "She", "her"),
        ("pilot", "He", "his")]  # fmt: skip


def _chats() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{q} a {job}."},
                {"role": "assistant", "content": f"The {job} starts early. {s} checks {p} notes."},
            ]
        }
        for job, s, p in JOBS
        for q in ("Describe", "Tell me about")
    ]


@pytest.mark.slow
def test_pca_and_select_cli_on_embedded_model(embedded_model, tmp_path, capsys):
    chats = _chats()
    cfg = ct.TrainConfig(max_steps=3, lr=1e-4, batch_size=2, progress=False)
    ft = ct.finetune(embedded_model, chats, cfg)
    assert not torch.equal(ft.W_E, embedded_model.W_E)  # a copy was trained, the base kept
    base_dir = ct.save_model(embedded_model, tmp_path / "base")
    ft_dir = ct.save_model(ft, tmp_path / "ft")
    del ft
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in chats) + "\n")

    pcs_dir = tmp_path / "pcs"
    args = ["directions", "pca", str(base_dir), str(ft_dir), str(data), "--hooks", HOOK]
    assert main([*args, "--out", str(pcs_dir), "--k", "4", "--assistant-only"]) == 0
    assert "explained variance" in capsys.readouterr().out
    assert {p.name for p in pcs_dir.iterdir()} == {"concepts.json", "directions.safetensors"}
    pcs = ConceptSet.load(pcs_dir)
    assert pcs.hooks == [HOOK]
    assert pcs[HOOK].shape == (4, 576)
    assert pcs.labels[HOOK] == ["PC0", "PC1", "PC2", "PC3"]
    assert pcs.is_orthonormal()
    ratios = pcs.scores[HOOK]
    assert all(0 < r <= 1 for r in ratios) and ratios == sorted(ratios, reverse=True)
    assert sum(ratios) <= 1 + 1e-9
    assert pcs.provenance["method"] == "pca"
    assert pcs.provenance["parameters"]["n_tokens"][HOOK] > 8  # assistant tokens of 8 chats
    pcs.validate(embedded_model)

    sel_dir = tmp_path / "picked"
    pick = ["directions", "select", str(pcs_dir), "--out", str(sel_dir)]
    assert main([*pick, "--pick", f"{HOOK}:0,2"]) == 0
    assert "selected 2 directions" in capsys.readouterr().out
    chosen = ConceptSet.load(sel_dir)
    assert chosen[HOOK].shape == (2, 576)
    assert torch.equal(chosen[HOOK], pcs[HOOK][[0, 2]])
    assert chosen.labels[HOOK] == ["PC0", "PC2"]
    assert chosen.provenance["history"][-1] == {"op": "select", "selection": {HOOK: [0, 2]}}
