"""caft-tl plan (memory from a config alone) and caft-tl convert."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config

import caft_tl as ct
from caft_tl.cli import main
from caft_tl.memory import estimate_finetune_memory
from tests.test_models import _save_random_hf

# Qwen2.5-Coder-32B-Instruct's config.json (the fields that matter): no weights needed.
QWEN32B = dict(
    hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
    num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
    tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip


@pytest.fixture(scope="module")
def qwen32b_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen32b")
    Qwen2Config(**QWEN32B).save_pretrained(folder)  # config.json only
    return folder


def test_plan_the_paper_scale_run_from_a_config(qwen32b_config, capsys):
    base = ["--dtype", "bfloat16", "plan", str(qwen32b_config), "--batch-size", "1"]
    base += ["--seq-len", "1024", "--lora-r", "32", "--gpu-gib", "80"]
    assert main([*base, "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "32.77B parameters" in out and "fits a 80 GiB GPU" in out
    assert main([*base, "--lora-form", "merged"]) == 0
    assert "does NOT fit a 80 GiB GPU" in capsys.readouterr().out


def test_plan_json_is_the_estimate_of_the_loaded_model(tmp_path, capsys):
    _save_random_hf("llama", tmp_path)
    args = ["plan", str(tmp_path), "--batch-size", "2", "--seq-len", "64", "--lora-r", "4"]
    assert main([*args, "--fsdp", "--world-size", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model = ct.load_model(tmp_path, device="cpu")
    expected = estimate_finetune_memory(
        model.cfg, batch_size=2, seq_len=64, lora=ct.LoraConfig(r=4), fsdp=True, world_size=2
    )
    assert printed == expected.to_dict()


def test_plan_of_something_else_is_a_clear_error(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nothing"), "--batch-size", "1", "--seq-len", "8"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_convert_a_bf16_folder_to_a_checkpoint(tmp_path, capsys):
    hf = _save_random_hf("qwen2", tmp_path / "hf")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no tokenizer"):
        assert (
            main(["--dtype", "bfloat16", "convert", str(tmp_path / "hf"), str(tmp_path / "ck")])
            == 0
        )
    assert "saved" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="no tokenizer"):
        direct = ct.load_model(tmp_path / "hf", device="cpu", dtype="bfloat16")
    converted = ct.load_model(tmp_path / "ck", device="cpu", dtype="bfloat16")
    for (name, a), (_, b) in zip(
        direct.named_parameters(), converted.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
