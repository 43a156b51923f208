"""NumPy helpers shared by the float64 references (no torch in any reference)."""
from __future__ import annotations

import math

import numpy as np

_erfc = np.frompyfunc(math.erfc, 1, 1)


def activation(x: np.ndarray, name: str | None) -> np.ndarray:
    """float64 activation by the kernels' names: relu, gelu (erf), gelu_tanh, silu, none."""
    x = np.asarray(x, dtype=np.float64)
    if name in (None, "none", "identity"):
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":
        return 0.5 * x * _erfc(-x / math.sqrt(2.0)).astype(np.float64)
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    raise ValueError(f"unknown activation {name!r}")
