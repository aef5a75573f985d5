"""CAFT fine-tuning under torchrun (2 CPU processes, gloo) against a single process with the
same global batch: same metrics, same final weights, and resume after a kill."""

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


def _run(out: Path, *extra: str, nproc: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable]
    if nproc is not None:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(SCRIPT), str(out), *extra]
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
