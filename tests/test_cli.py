from __future__ import annotations

import json

import pytest

import caft_tl as ct
from caft_tl.activations import Activations
from caft_tl.cli import main


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    return ct.save_model(tiny_model, tmp_path_factory.mktemp("ckpt") / "tiny")


def test_info_json(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_layers"] == 2 and "hook_resid_post" in info["hooks_per_block"]


def test_info_text(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    assert "blocks.L.hook_resid_post" in capsys.readouterr().out


def test_cache_chat_jsonl(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    data.write_text("\n".join(json.dumps(line) for _ in range(3)))
    args = ["cache", str(tiny_checkpoint), str(data), "--hooks", "blocks.1.hook_resid_post"]
    assert main([*args, "--out", str(tmp_path / "acts"), "--positions", "assistant"]) == 0
    acts = Activations.load(tmp_path / "acts")
    assert acts.meta["n_examples"] == 3 and len(acts) > 0


def test_cache_text_file(tiny_checkpoint, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("first text\n\nsecond text\n")
    hooks = ["--hooks", "blocks.0.hook_resid_post"]
    assert (
        main(["cache", str(tiny_checkpoint), str(data), *hooks, "--out", str(tmp_path / "a")]) == 0
    )
    assert Activations.load(tmp_path / "a").meta["n_examples"] == 2


def test_cache_errors_are_clear(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{"messages": 3}\n')
    args = ["cache", str(tiny_checkpoint), str(bad), "--hooks", "blocks.0.hook_resid_post"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl, line" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text("text\n")
    args = ["cache", str(tiny_checkpoint), str(good), "--hooks", "blocks.7.hook_resid_post"]
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2
    assert "unknown hook" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_pipeline(embedded_model, capsys):
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "assistant-token activations" in out
