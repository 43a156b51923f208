"""Shared test setup: the Triton interpreter on CPU-only machines, poisoned outputs, the backend switch.

- On a machine without CUDA, TRITON_INTERPRET=1 is set before anything imports Triton, so the
  "triton" backend runs the real kernels through the interpreter on CPU tensors.
- Every launcher allocates its outputs poisoned (NaN / -1) during tests, so an element a kernel
  forgets to write fails the reference check.
- The `backend` fixture runs a test once through the Triton kernel and once through the torch
  fallback; `device` is cuda when there is a GPU (the same tests then run compiled kernels).
- Inputs are fresh random draws each run (the seed is printed, shown by pytest on failure).
"""
from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("TRITONLAB_BACKEND", None)

import pytest  # noqa: E402

from tritonlab.kernels import _backend  # noqa: E402
from tritonlab.kernels._triton import HAS_TRITON  # noqa: E402

GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
    yield


@pytest.fixture(params=["triton", "torch"])
def backend(request) -> str:
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("Triton is not installed")
    return request.param


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if GPU else "cpu")
