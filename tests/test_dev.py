"""dev.py, the README's two commands: how it runs the test suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def dev():
    path = Path(__file__).parents[1] / "dev.py"
    spec = importlib.util.spec_from_file_location("dev_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tests_run_on_one_worker_per_core_up_to_four(dev, monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    assert dev.parallel_args([]) == ["-n", "2", "--dist", "loadscope"]
    assert dev.parallel_args(["-k", "models", "-x"]) == ["-n", "2", "--dist", "loadscope"]
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 16)
    assert dev.parallel_args([])[:2] == ["-n", "4"]


@pytest.mark.parametrize("extra", [["-n", "0"], ["-n0"], ["--numprocesses=3"], ["-p", "no:xdist"]])
def test_the_callers_choice_of_workers_is_kept(dev, monkeypatch, extra):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    assert dev.parallel_args(extra) == []


def test_one_core_runs_in_one_process(dev, monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 1)
    assert dev.parallel_args([]) == []


def test_the_suite_still_collects_without_xdist():
    # The conftest's xdist scheduler hook must not make pytest refuse `-p no:xdist` runs.
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only", "-q",
         "tests/test_dev.py"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_one_core_runs_in_one_process" in done.stdout
