"""Tolerances and error measures, stated once for tests, the tuner and the benchmark harness.

The error measure is the relative Frobenius error ||out - ref|| / ||ref|| against a float64 NumPy
reference. Bounds by the precision of the math (DESIGN.md, "References and checks"):
float32 math ~1e-6, tf32 dots 3e-4, bf16/fp16 operands 1e-2, int8 accumulation exact.
"""
from __future__ import annotations

import math

import numpy as np
import torch

#: relative-error bounds by operand dtype (the float32 bound allows for reduction-order differences
#: over long dot products: sqrt(K) * 2**-24 stays under it up to K ~ 10**4)
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 5e-6,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
TF32_TOLERANCE = 3e-4


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> float:
    """Relative-error bound for results computed from operands of `dtype`."""
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    if dtype not in TOLERANCES:
        raise ValueError(f"no stated tolerance for {dtype}")
    return TOLERANCES[dtype]


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """float64 NumPy copy of a tensor (any device, any float dtype)."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float64) if t.dtype.kind in "fc" and t.dtype != np.complex128 else t
    t = t.detach().cpu()
    if t.is_complex():
        return t.to(torch.complex128).numpy()
    if t.is_floating_point():
        return t.to(torch.float64).numpy()
    return t.numpy()


def rel_error(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64; inf if out has NaN/inf or the shapes differ."""
    o, r = to_numpy(out), to_numpy(ref)
    if o.shape != r.shape:
        return math.inf
    if o.size == 0:
        return 0.0
    if not np.all(np.isfinite(o)):
        return math.inf
    diff = float(np.linalg.norm((o - r).ravel()))
    scale = float(np.linalg.norm(r.ravel()))
    return diff / scale if scale > 0 else diff


def assert_close(out: torch.Tensor, ref: np.ndarray | torch.Tensor, tol: float, what: str = "output") -> None:
    """AssertionError with the measured error unless rel_error(out, ref) <= tol."""
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds {tol:.1e} (shape {tuple(out.shape)})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with values a correct kernel never leaves: NaN for floats, -1 for ints."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    return t.fill_(-1)
