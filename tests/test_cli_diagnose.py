"""`caft-tl diagnose`: each sub-command on a tiny checkpoint writes its tables, figures and
report; bad input is a clear error (exit 2)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import caft_tl as ct
from caft_tl.cli import main
from caft_tl.diagnostics import AblationShift, SteeringSweep

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return ct.save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def concepts_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    directions = {h: torch.linalg.qr(torch.randn(64, 1, generator=g))[0].T for h in HOOKS}
    return ct.ConceptSet(directions).save(tmp_path_factory.mktemp("c") / "concepts")


def test_diagnose_all_with_training(checkpoint, concepts_dir, tmp_path, capsys):
    out = tmp_path / "diag"
    args = ["diagnose", "all", str(concepts_dir), "--model", str(checkpoint), "--n", "8",
            "--coefs", "-2", "2", "--probe", "--train", "--seeds", "0", "--steps", "2",
            "--n-train", "16", "--ks", "3", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Sign report" in text and "female-male" in text and "Training decomposition" in text
    shift = AblationShift.load(out / "shift")
    assert set(shift.table["kind"]) == {"direction", "probe"}
    sweep = SteeringSweep.load(out / "steer")
    assert sweep.meta["n_examples"] == 8
    assert len(pd.read_csv(out / "sign_report.csv")) == 3  # two directions and all
    decomposition = pd.read_csv(out / "decomposition.csv")
    assert set(decomposition["condition"]) == {
        "plain", "zero", "detached", "gradient", "steer+3", "steer-3"
    }  # fmt: skip
    page = (out / "report.html").read_text()
    assert "4. Training decomposition" in page and "3. Sign report" in page
    for name in ("shift.html", "steer.html", "decomposition.html"):
        assert (out / name).exists()


def test_diagnose_steer_on_user_jsonl(checkpoint, concepts_dir, tmp_path, capsys):
    rows = ct.tasks.gender_pronoun("ood", n=6, answer_format="pronoun").to_list()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "d"
    args = ["diagnose", "steer", str(concepts_dir), "--model", str(checkpoint), "--data",
            str(data), "--coefs", "1", "--all-only", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert SteeringSweep.load(out / "steer").direction_sets == ["all"]
    assert "shift" not in {p.name for p in out.iterdir()}
    assert "2. Ablation vs steering" in (out / "report.html").read_text()


def test_diagnose_errors_are_clear(checkpoint, concepts_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    row = json.dumps({"prompt": "p", "options": [" a", " b"], "answer": " a"})
    bad.write_text(row + "\n" + "{not json\n")
    base = ["diagnose", "steer", str(concepts_dir), "--model", str(checkpoint)]
    assert main([*base, "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main([*base, "--task", "double_mc:colours|verbs", "--out", str(tmp_path / "o")]) == 2
    assert "double_mc:INTENDED|DISTRACTOR" in capsys.readouterr().err
    assert main(["diagnose", "shift", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
