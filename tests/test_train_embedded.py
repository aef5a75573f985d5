"""Fine-tuning the embedded SmolLM2-135M-Instruct end to end: Python API, CLI, kill/resume.

Each run is 2 steps of 2 short chats, on CPU. Memory: a model copy is ~650 MB and its
AdamW state ~1.3 GB, so models are deleted as soon as they have been checked.
"""

from __future__ import annotations

import gc
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from caft_tl import cli
from caft_tl.directions import ConceptSet
from caft_tl.directions.baselines import random_directions
from caft_tl.interventions import Ablation
from caft_tl.lora import LoraConfig
from caft_tl.train import TrainConfig, finetune

pytestmark = pytest.mark.slow

HOOK = "blocks.15.hook_resid_post"
CHATS = [
    [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for q, a in [
        ("Capital of France?", "Paris."),
        ("Two plus two?", "Four."),
        ("Colour of grass?", "Green."),
        ("Opposite of hot?", "Cold."),
    ]
]


class Killed(Exception):
    """Stands in for a crash or pre-emption in the middle of a run."""


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=2, batch_size=2, lr=1e-4, progress=False)
    return TrainConfig(**{**base, **kw})


def concepts(width: int, k: int = 8) -> ConceptSet:
    like = ConceptSet({HOOK: torch.zeros(k, width)})
    return random_directions(like, seed=0)


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def max_diff(a, b) -> float:
    other = dict(b.named_parameters()) if not isinstance(b, dict) else b
    return max((p.detach() - other[n]).abs().max().item() for n, p in a.named_parameters())


@pytest.fixture(autouse=True)
def deterministic():
    """Bit-for-bit comparisons need deterministic kernels: on a multi-threaded CPU the
    backward of TransformerLens's ``W_E[tokens]`` (an accumulating ``index_put_``) adds the
    gradients of repeated tokens in a varying order, so without this even two unbroken runs
    can differ in the last bits of ``W_E`` (and, after one more step, everywhere)."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def test_plain_and_caft_two_steps(embedded_model):
    base_fp = fingerprint(embedded_model)
    ablation = Ablation(concepts(embedded_model.cfg.d_model))

    plain = finetune(embedded_model, CHATS, cfg())
    assert fingerprint(embedded_model) == base_fp  # a copy was trained
    assert max_diff(plain, embedded_model) > 0
    plain_weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
    del plain
    gc.collect()

    steps = []
    caft = finetune(embedded_model, CHATS, cfg(), intervention=ablation, callback=steps.append)
    assert [s["step"] for s in steps] == [1, 2]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert fingerprint(embedded_model) == base_fp
    assert not any(hp._forward_hooks for hp in caft.hook_dict.values())  # hooks removed
    assert not any(hp._forward_hooks for hp in embedded_model.hook_dict.values())
    assert max_diff(caft, plain_weights) > 0  # the ablation changed the update
    assert all(torch.isfinite(p).all() for p in caft.parameters())
    del caft, plain_weights
    gc.collect()


def test_cli_with_concepts_and_kill_resume(embedded_model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    concepts(embedded_model.cfg.d_model).save(tmp_path / "concepts")

    # A straight 2-step CAFT run from the command line.
    argv = ["finetune", "embedded", str(data), "--out", str(tmp_path / "cli")]
    argv += ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-4", "--quiet"]
    argv += ["--concepts", str(tmp_path / "concepts"), "--mode", "zero"]
    assert cli.main(argv) == 0
    assert "trained to step 2" in capsys.readouterr().out
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["intervention"].startswith("Ablation(mode='zero', 8 directions")
    straight = load_file(str(tmp_path / "cli" / "final" / "model.safetensors"))
    gc.collect()

    # The same run from Python, killed after step 1 and resumed.
    ablation = Ablation(ConceptSet.load(tmp_path / "concepts"))
    out = tmp_path / "killed"

    def kill(record):
        if record["step"] == 1:
            raise Killed

    with pytest.raises(Killed):
        finetune(
            embedded_model, CHATS, cfg(save_every=1), intervention=ablation, out=out, callback=kill
        )
    gc.collect()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1 and not (out / "final").exists()

    steps = []
    resumed = finetune(
        embedded_model,
        CHATS,
        cfg(save_every=1),
        intervention=ablation,
        out=out,
        resume=True,
        callback=steps.append,
    )
    assert [s["step"] for s in steps] == [2]  # only the missing step ran
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]
    params = dict(resumed.named_parameters())
    assert set(params) == set(straight)
    for name, p in params.items():
        assert torch.equal(p.detach(), straight[name]), name
    del resumed, straight, params
    gc.collect()


def test_lora_with_gradient_checkpointing_matches_the_plain_lora_run(embedded_model):
    # The embedded model through the fast path: factored adapters, checkpointed blocks.
    lora = cfg(lora=LoraConfig(r=8), lr=1e-3)
    ablation = Ablation(concepts(embedded_model.cfg.d_model))
    plain = finetune(embedded_model, CHATS, lora, intervention=ablation)
    plain_weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
    del plain
    gc.collect()
    ckpt = finetune(
        embedded_model, CHATS, cfg(lora=LoraConfig(r=8), lr=1e-3, gradient_checkpointing=True),
        intervention=ablation,
    )  # fmt: skip
    assert max_diff(ckpt, embedded_model) > 1e-5  # the adapters trained and were merged
    assert max_diff(ckpt, plain_weights) < 1e-5
    del ckpt, plain_weights
    gc.collect()
