"""Shared test setup: the Triton interpreter on CPU-only machines, poisoned outputs, the backend switch.

- On a machine without CUDA, TRITON_INTERPRET=1 is set before anything imports Triton, so the
  "triton" backend runs the real kernels through the interpreter on CPU tensors.
- Every launcher allocates its outputs poisoned (NaN / -1) during tests, so an element a kernel
  forgets to write fails the reference check.
- The `backend` fixture runs a test once through the Triton kernel and once through the torch
  fallback; `device` is cuda when there is a GPU (the same tests then run compiled kernels).
- Inputs are fresh random draws each run (the seed is printed, shown by pytest on failure).
- Under the interpreter, float32 <-> bfloat16 conversions inside kernels are done as a GPU does
  them (_convert_bf16_like_a_gpu).
"""
from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("TRITONLAB_BACKEND", None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tritonlab.kernels import _backend  # noqa: E402
from tritonlab.kernels._triton import HAS_TRITON  # noqa: E402

GPU = torch.cuda.is_available()


def _convert_bf16_like_a_gpu() -> None:
    """The interpreter's float32 -> bfloat16 cast truncates (about half of random values end one
    bf16 step off, doubling the rounding error of every bf16 store) and its bfloat16 -> float32
    conversion gets subnormals wrong (-1.19e-39 loads as -7.3e-39); a GPU rounds to nearest even and
    converts exactly. The tests hold kernels to bf16 tolerances against float64 references, so
    under the interpreter these two conversions go through torch's, which match the GPU's. Every
    other cast is left as it is. Nothing changes when the interpreter's internals differ."""
    if GPU or not HAS_TRITON:
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if original is None or handle is None:
        return

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle(rounded.view(torch.int16).numpy().view(np.uint16), dst_ty)
        if src_ty == tl.bfloat16 and dst_ty == tl.float32:
            bits = torch.from_numpy(np.array(src.data, dtype=np.uint16).view(np.int16))
            return handle(bits.view(torch.bfloat16).float().numpy(), dst_ty)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl


_convert_bf16_like_a_gpu()


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
    # TRITONLAB_TEST_SEED replays a failure's draw (its seed is printed below).
    seed = int(os.environ.get("TRITONLAB_TEST_SEED") or random.SystemRandom().randrange(2**31))
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
