"""Guarded Triton import: every kernel module takes `triton`, `tl` and `jit` from here.

`import tritonlab` must work where Triton is not installed (macOS, Windows, a CPU-only image).
There `HAS_TRITON` is False, `jit` returns a stub that raises when launched, and `tl.constexpr`
still exists so that kernel signatures evaluate; the torch fallbacks serve every op.
"""
from __future__ import annotations

import os
from typing import Any, Callable

try:  # pragma: no cover - exercised by the platform, not by a test
    import triton
    import triton.language as tl

    HAS_TRITON = True
    jit = triton.jit
except ImportError:  # pragma: no cover
    HAS_TRITON = False
    triton = None

    class _LanguageShim:
        """Just enough of `triton.language` for kernel signatures to evaluate."""

        constexpr = object

    tl = _LanguageShim()  # type: ignore[assignment]

    def jit(fn: Callable[..., Any] | None = None, **_: Any) -> Any:
        def wrap(f: Callable[..., Any]) -> Any:
            class _Missing:
                def __getitem__(self, grid: Any) -> Callable[..., Any]:
                    raise RuntimeError(f"Triton is not installed: cannot launch {f.__name__}")

            return _Missing()

        return wrap(fn) if fn is not None else wrap


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Activation codes shared by every kernel epilogue (a constexpr int selects the branch at compile time).
ACTIVATION_CODES = {None: 0, "none": 0, "identity": 0, "relu": 1, "gelu": 2, "silu": 3, "gelu_tanh": 4}

if HAS_TRITON:

    @jit
    def _std_normal_cdf(x):
        """Phi(x) = erfc(-x / sqrt 2) / 2 with erfc from a Chebyshev fit (relative error < 1.2e-7
        everywhere, Numerical Recipes 6.2); 1 + erf(x) would lose all digits for x < -3. Only exp
        is used, so it runs in the interpreter as on the GPU."""
        z = tl.abs(x) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * z)
        poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
            0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
        tail = 0.5 * t * tl.exp(poly - z * z)  # Phi(-|x|)
        return tl.where(x >= 0, 1.0 - tail, tail)

    @jit
    def apply_activation(x, ACT: tl.constexpr):
        """Elementwise activation on a float32 tile; ACT is one of ACTIVATION_CODES' values."""
        if ACT == 1:
            x = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN, as in torch.relu (tl.maximum would give 0)
        elif ACT == 2:  # exact GELU x * Phi(x), Phi through erfc so the negative tail keeps its precision
            x = x * _std_normal_cdf(x)
        elif ACT == 3:
            x = x / (1.0 + tl.exp(-x))
        elif ACT == 4:  # tanh-approximated GELU: 0.5 (1 + tanh(u)) = sigmoid(2u), no cancellation
            inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = x / (1.0 + tl.exp(-2.0 * inner))
        return x
