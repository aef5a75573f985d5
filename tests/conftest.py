"""Shared fixtures. Unit tests use tiny random models; tests marked ``slow`` use the
embedded SmolLM2-135M-Instruct (converted once per machine into the user cache)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)


def _threads() -> int:
    """Two threads in one process (as every measurement in the README); under pytest-xdist each
    worker gets its share of the cores, since two workers on 2 threads each on 2 cores slow
    each other down many times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, torch.get_num_threads(), (os.cpu_count() or 1) // workers))


torch.set_num_threads(_threads())
if "PYTEST_XDIST_WORKER" in os.environ:
    # What a test starts (notebook kernels, CLI and benchmark subprocesses) inherits it.
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


# optionalhook: with ``-p no:xdist`` (or xdist missing) pytest would otherwise refuse the
# whole run as an unknown hook.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N --dist loadscope`` (what ``python3 dev.py test`` runs): each test module is
    one unit that runs on one worker (its module fixtures are built once), each notebook is a
    unit of its own, and units go out in collection order (see below), not by size."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if "::test_notebook_executes[" in nodeid:
                return nodeid
            return nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the longest units first (notebooks, then the embedded model's tests),
    so that no worker is left with one at the end while the other idles. One process keeps the
    files' order (quick tests first, for -x)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return

    def rank(item) -> int:
        if "test_notebook_executes" in item.name:
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)  # stable: the order within each rank stays


@pytest.fixture(scope="session")
def tokenizer():
    from caft_tl.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from caft_tl.models import tiny

    return tiny(tokenizer=tokenizer)


@pytest.fixture(scope="session")
def embedded_model():
    from caft_tl.models import load_model

    return load_model(device="cpu")


@pytest.fixture
def two_threads():
    """Torch on two threads for one test, whatever its worker's share of the cores: the
    order-of-summation bugs that threads cause do not show on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
