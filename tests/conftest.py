"""Shared fixtures. Unit tests use tiny random models; tests marked ``slow`` use the
embedded SmolLM2-135M-Instruct (converted once per machine into the user cache)."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
