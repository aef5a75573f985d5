"""torchrun (CPU processes, gloo) against a single process: CAFT fine-tuning with the same
global batch gives the same metrics and final weights (also with LoRA and gradient
checkpointing) and resumes after a kill; activation caching and diffs split across ranks
give the same activations, in the same on-disk format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import caft_tl as ct
from caft_tl import distributed

SCRIPT = Path(__file__).with_name("ddp_finetune.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(
    out: Path, *extra: str, nproc: int | None = None, script: Path = SCRIPT
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(script), str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return dict(ct.load_model(out / "final", device="cpu").state_dict())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    _ok(_run(out))
    return out


def _same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4, 5]
    for x, y in zip(ma, mb, strict=True):
        assert x["tokens"] == y["tokens"]  # the same global batch, target for target
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=0, msg=name)


def test_two_processes_train_like_one(single, tmp_path):
    out = tmp_path / "ddp"
    _ok(_run(out, nproc=2))
    _same_run(single, out)
    # Rank 0 alone wrote: one line per step, one checkpoint, one final model.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())


def test_lora_with_gradient_checkpointing_trains_like_one(tmp_path):
    flags = ("--lora", "--checkpointing")
    _ok(_run(tmp_path / "single", *flags))
    _ok(_run(tmp_path / "ddp", *flags, nproc=2))
    _same_run(tmp_path / "single", tmp_path / "ddp")


def test_fsdp_trains_and_resumes_like_one(single, tmp_path):
    out = tmp_path / "fsdp"
    _ok(_run(out, "--fsdp", "--stop-after", "2", nproc=2), code=1)
    _ok(_run(out, "--fsdp", "--resume", nproc=2))  # the optimiser state goes back into shards
    _same_run(single, out)


def test_fsdp_with_lora_and_checkpointing_resumes_like_one_process(tmp_path):
    flags = ("--lora", "--checkpointing")
    _ok(_run(tmp_path / "single", *flags))
    out = tmp_path / "fsdp"
    _ok(_run(out, *flags, "--fsdp", "--stop-after", "2", nproc=2), code=1)
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    # Checkpoints have one format: the sharded run resumes without sharding, on 1 process.
    _ok(_run(out, *flags, "--resume"))
    _same_run(tmp_path / "single", out)


def test_distributed_run_resumes_after_a_kill(single, tmp_path):
    out = tmp_path / "ddp"
    _ok(_run(out, "--stop-after", "2", nproc=2), code=1)  # torchrun reports the failure
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    _ok(_run(out, "--resume", nproc=2))
    _same_run(single, out)


def test_helpers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup() is False
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.sum_over_ranks(2.5) == 2.5
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_incomplete_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="start the run with torchrun"):
        distributed.setup()


# ------------------------------------------------------------------------ activation caching

CACHE_SCRIPT = Path(__file__).with_name("ddp_cache.py")


def _cache(out: Path, nproc: int | None = None) -> None:
    _ok(_run(out, nproc=nproc, script=CACHE_SCRIPT))


def _same_activations(a: Path, b: Path) -> None:
    x, y = ct.Activations.load(a), ct.Activations.load(b)
    assert x.hooks == y.hooks and len(x) == len(y) > 0
    assert x.token_ids == y.token_ids
    for key in ("example", "position", "token", "target"):
        assert torch.equal(getattr(x.rows, key), getattr(y.rows, key)), key
    for hook in x.hooks:
        torch.testing.assert_close(x[hook], y[hook], atol=1e-6, rtol=0, msg=hook)
    meta = {k: v for k, v in x.meta.items() if k not in ("path", "shards")}
    assert meta == {k: v for k, v in y.meta.items() if k not in ("path", "shards")}


@pytest.mark.parametrize("nproc", [2, 4])  # 4 ranks: 6 batches do not split evenly
def test_distributed_caching_equals_one_process(tmp_path, nproc):
    _cache(tmp_path / "single")
    _cache(tmp_path / "ddp", nproc=nproc)
    for part in ("cache", "diff/diff", "diff/base", "diff/finetuned", "memory"):
        _same_activations(tmp_path / "single" / part, tmp_path / "ddp" / part)
    # The shards were moved into place: no per-rank folders are left behind.
    assert not list((tmp_path / "ddp").rglob(".parts"))
    assert len(ct.Activations.load(tmp_path / "ddp" / "cache").meta["shards"]) > nproc


def test_distributed_caching_refuses_a_used_folder(tmp_path):
    (tmp_path / "ddp" / "cache").mkdir(parents=True)
    (tmp_path / "ddp" / "cache" / "keep.txt").write_text("mine")
    proc = _run(tmp_path / "ddp", nproc=2, script=CACHE_SCRIPT)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert (tmp_path / "ddp" / "cache" / "keep.txt").read_text() == "mine"


def test_cli_cache_under_torchrun(tmp_path):
    from caft_tl.models import save_model, tiny

    checkpoint = save_model(tiny(seed=0), tmp_path / "tiny")
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(f"text number {i} " * (1 + i % 4) for i in range(9)))
    args = [str(checkpoint), str(data), "--hooks", "blocks.1.hook_resid_post"]
    args += ["--batch-size", "2", "--positions", "last"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd, out in (
        ([sys.executable, "-m", "caft_tl.cli", "--device", "cpu", "cache"], tmp_path / "one"),
        ([*ddp, "-m", "caft_tl.cli", "cache"], tmp_path / "two"),  # each rank: its device
    ):
        proc = subprocess.run(
            [*cmd, *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
        )
        _ok(proc)
        assert proc.stdout.count("Activations(9 tokens from 9 examples") == 1  # rank 0 prints
    _same_activations(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_embedded_model_fsdp_lora_checkpointing_from_the_cli(embedded_model, tmp_path):
    """The paper-scale recipe (LoRA, gradient checkpointing, FSDP, CAFT) on the real model:
    2 sharded processes from the command line equal one plain process."""
    from safetensors.torch import load_file

    from caft_tl.directions import ConceptSet, random_directions

    hook = "blocks.15.hook_resid_post"
    like = ConceptSet({hook: torch.zeros(8, embedded_model.cfg.d_model)})
    random_directions(like, seed=0).save(tmp_path / "concepts")
    chats = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Capital of France?", "Paris."), ("Two plus two?", "Four."),
                     ("Colour of grass?", "Green."), ("Opposite of hot?", "Cold.")]
    ]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    args = ["finetune", "embedded", str(data), "--max-steps", "2", "--batch-size", "2"]
    args += ["--lr", "1e-3", "--lora-r", "4", "--gradient-checkpointing", "--quiet"]
    args += ["--concepts", str(tmp_path / "concepts"), "--mode", "zero"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for cmd, out, extra in (
        ([sys.executable, "-m", "caft_tl.cli", "--device", "cpu"], tmp_path / "one", []),
        ([*ddp, "-m", "caft_tl.cli"], tmp_path / "fsdp", ["--fsdp"]),
    ):
        proc = subprocess.run(
            [*cmd, *args, "--out", str(out), *extra],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        _ok(proc)
        assert proc.stdout.count("trained to step 2") == 1  # rank 0 reports
    for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "fsdp"), strict=True):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)  # step 2: after one update
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3)
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert one.keys() == two.keys()
    base = {n: p.detach() for n, p in embedded_model.named_parameters()}
    moved = [n for n in one if not torch.equal(one[n], base[n])]
    assert len(moved) > 200  # the adapters trained and were merged into every targeted matrix
    # Not element for element: a fresh LoRA B gets AdamW's first step, lr * sign(gradient),
    # so a gradient entry at rounding level (summed over 2 ranks vs 1) can flip sign.
    # Measured: 0.02% of entries differ by more than 1e-5, 2e-4 of the total change.
    change = sum((one[n] - base[n]).abs().sum() for n in one)
    diff = sum((two[n] - one[n]).abs().sum() for n in one)
    assert diff / change < 1e-3
    off = sum(int(((two[n] - one[n]).abs() > 1e-5).sum()) for n in one)
    assert off / sum(t.numel() for t in one.values()) < 1e-3
