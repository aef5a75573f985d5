"""The `caft-tl directions` pipeline end to end on tiny models: pca -> select -> interpret,
and sae -> rank."""

from __future__ import annotations

import json

import pytest
import torch

import caft_tl as ct
from caft_tl.cli import main
from caft_tl.directions import ConceptSet

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("dirs")
    base = ct.save_model(ct.models.tiny(tokenizer=tokenizer, seed=0), root / "base")
    ft = ct.save_model(ct.models.tiny(tokenizer=tokenizer, seed=1), root / "ft")
    data = root / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer number {i} is here."},
            ]
        }
        for i in range(12)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return root, base, ft, data


def test_pca_select_interpret(setup, capsys):
    root, base, ft, data = setup
    args = ["directions", "pca", str(base), str(ft), str(data), "--hooks", HOOK]
    assert main([*args, "--out", str(root / "pca"), "--k", "4", "--assistant-only"]) == 0
    pcs = ConceptSet.load(root / "pca")
    assert pcs[HOOK].shape == (4, 64)
    assert "explained variance" in capsys.readouterr().out

    pick = ["directions", "select", str(root / "pca"), "--out", str(root / "sel")]
    assert main([*pick, "--pick", f"{HOOK}:0,2"]) == 0
    chosen = ConceptSet.load(root / "sel")
    assert torch.equal(chosen[HOOK], pcs[HOOK][[0, 2]])

    pos, neg = root / "pos.txt", root / "neg.txt"
    pos.write_text("he is a man\nthe king and his son\nmy father\n")
    neg.write_text("she is a woman\nthe queen and her daughter\nmy mother\n")
    hints = ["--hints", str(pos), str(neg), "--model", str(base), "--min-auroc", "0.5"]
    assert main(["directions", "select", str(root / "pca"), "--out", str(root / "h"), *hints]) == 0
    assert "auroc" in capsys.readouterr().out

    page = root / "report.html"
    assert (
        main(
            [
                "directions",
                "interpret",
                str(base),
                str(root / "sel"),
                str(data),
                "--out",
                str(page),
                "--k",
                "3",
            ]
        )
        == 0
    )
    assert page.stat().st_size > 0 and "PC0" in page.read_text()


def test_select_errors(setup, capsys):
    root, base, ft, data = setup
    args = ["directions", "pca", str(base), str(ft), str(data), "--hooks", HOOK]
    main([*args, "--out", str(root / "pca2"), "--k", "2"])
    sel = ["directions", "select", str(root / "pca2"), "--out", str(root / "x")]
    assert main(sel) == 2
    assert "either --pick" in capsys.readouterr().err
    assert main([*sel, "--pick", "blocks.1.hook_resid_post:7"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*sel, "--pick", "nohook"]) == 2


def test_sae_and_rank(setup):
    root, base, ft, data = setup
    train = ["directions", "sae", str(base), str(data), "--hook", HOOK, "--out", str(root / "sae")]
    assert main([*train, "--d-sae", "64", "--k", "4", "--training-tokens", "4000"]) == 0
    rank = ["directions", "rank", str(root / "sae"), str(base), str(ft), str(data)]
    assert main([*rank, "--out", str(root / "ranked"), "--top", "5"]) == 0
    ranked = ConceptSet.load(root / "ranked")
    assert ranked[HOOK].shape[1] == 64 and 5 <= len(ranked[HOOK]) <= 15
