from __future__ import annotations

import json

import pytest
import torch

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


# ---------------------------------------------------------------------------------- finetune

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo!"}]}


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(CHAT) for _ in range(4)))
    return path


@pytest.fixture(scope="module")
def concepts_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    concepts = ct.ConceptSet({"blocks.0.hook_resid_post": torch.randn(2, 64, generator=g)})
    return concepts.orthonormalised().save(tmp_path_factory.mktemp("concepts") / "c")


def finetune_args(checkpoint, data, out, *extra):
    fast = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--quiet"]
    return ["finetune", str(checkpoint), str(data), "--out", str(out), *fast, *extra]


def test_finetune_plain(tiny_checkpoint, chat_file, tmp_path, capsys):
    assert main(finetune_args(tiny_checkpoint, chat_file, tmp_path / "run")) == 0
    assert "trained to step 2" in capsys.readouterr().out
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["intervention"] is None and run["config"]["max_steps"] == 2
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 2
    ct.load_model(tmp_path / "run/final", device="cpu")


def test_finetune_with_concepts_and_lora(tiny_checkpoint, chat_file, concepts_dir, tmp_path):
    out = tmp_path / "run"
    extra = ["--concepts", str(concepts_dir), "--mode", "zero", "--lora-r", "2"]
    extra += ["--keep-checkpoints", "1"]
    assert main(finetune_args(tiny_checkpoint, chat_file, out, *extra)) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["intervention"].startswith("Ablation(mode='zero'")
    assert run["config"]["lora"]["r"] == 2
    ct.load_model(out / "step-1", device="cpu")
    assert sorted(p.name for p in (out / "final").iterdir())[0] == "caft_tl.json"


def test_finetune_bf16_with_gradient_checkpointing(tiny_checkpoint, chat_file, tmp_path):
    out = tmp_path / "run"
    args = finetune_args(tiny_checkpoint, chat_file, out, "--gradient-checkpointing")
    assert main(["--dtype", "bfloat16", *args]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["gradient_checkpointing"] is True
    from safetensors import safe_open

    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:  # trained in bf16
        assert f.get_tensor("blocks.0.attn.W_Q").dtype == torch.bfloat16
    assert ct.load_model(out / "final", device="cpu").W_E.dtype == torch.float32  # the default


def test_finetune_mean_fits_on_the_training_data(tiny_checkpoint, concepts_dir, tmp_path):
    rows = [{"prompt": "Q: 2+2? A:", "answer": " 4"}, {"prompt": "Q: sky? A:", "answer": " blue"}]
    data = tmp_path / "pa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    for mode, extra in (("mean", []), ("steer", ["--coef", "-2"])):
        args = ["--concepts", str(concepts_dir), "--mode", mode, *extra]
        assert main(finetune_args(tiny_checkpoint, data, tmp_path / mode, *args)) == 0
    run = json.loads((tmp_path / "steer/run.json").read_text())
    assert run["intervention"].startswith("Steering(coef=-2.0")


def test_finetune_resume_of_a_finished_run(tiny_checkpoint, chat_file, tmp_path, capsys):
    args = finetune_args(tiny_checkpoint, chat_file, tmp_path / "run")
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # without --resume the folder is refused
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "already finished at step 2; nothing left to train" in capsys.readouterr().out
    assert main([*args, "--resume", "--lr", "5e-3"]) == 2  # another config: refused
    assert "config differs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "zero"], "--mode and --coef need --concepts"),
        (["--concepts", "{concepts}", "--mode", "steer"], "--mode steer needs --coef"),
        (["--concepts", "{concepts}", "--coef", "1"], "--coef goes with --mode steer"),
        (["--concepts", "{tmp}/nowhere"], "no such folder"),
        (["--lora-targets", "q_proj"], "valid targets: W_Q"),
        (["--keep-checkpoints", "0"], "keep_checkpoints"),
    ],
)
def test_finetune_usage_errors(
    tiny_checkpoint, chat_file, concepts_dir, tmp_path, capsys, extra, message
):
    extra = [e.format(concepts=concepts_dir, tmp=tmp_path) for e in extra]
    assert main(finetune_args(tiny_checkpoint, chat_file, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("caft-tl: error:") and message in err
    assert not (tmp_path / "run").exists()


def test_finetune_bad_mode_and_missing_data(tiny_checkpoint, chat_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(finetune_args(tiny_checkpoint, chat_file, tmp_path / "r", "--mode", "sideways"))
    assert exc.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err
    assert main(finetune_args(tiny_checkpoint, tmp_path / "none.jsonl", tmp_path / "r")) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_pipeline(embedded_model, capsys):
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "assistant-token activations" in out


def test_library_bugs_keep_their_traceback(monkeypatch, capsys):
    # Only errors the user can fix become a one-line message with exit code 2.
    from caft_tl.cli import app
    from caft_tl.errors import InputKeyError

    def bug(args):
        return {}["missing"]

    def user_error(args):
        raise InputKeyError("'blocks.99.hook_resid_post' was not cached")

    monkeypatch.setattr(app, "cmd_info", bug)  # the parser binds commands when built
    with pytest.raises(KeyError, match="missing"):
        main(["info"])
    monkeypatch.setattr(app, "cmd_info", user_error)
    assert main(["info"]) == 2
    assert capsys.readouterr().err.strip() == (
        "caft-tl: error: 'blocks.99.hook_resid_post' was not cached"
    )
