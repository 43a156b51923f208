"""NumPy references for the quantized family (no torch), written from the rules of DESIGN.md.

Quantization is defined in float32 (the scale is a float32 number and x / scale is formed as
x * (1 / scale) in float32), so the reference does exactly that arithmetic; rounding half to
even is `np.rint`, fp8 rounding is `ml_dtypes`' cast after the clamp (ml_dtypes casts do not
saturate). GEMMs: exact int64 arithmetic for int8 (float64 above 10**8 multiply-adds, still
exact since K * 127**2 < 2**53), float64 on the exact fp8 values otherwise; the epilogue in float64.
"""
from __future__ import annotations

import math
from typing import Optional

import ml_dtypes
import numpy as np

from .._numpy_ref import activation as activation_ref

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
NP_QDTYPE = {"int8": np.int8, "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
_AXIS = {"row": 1, "column": 0, "tensor": None}
#: smallest scale of a non-zero slice: 2**-126, the smallest normal float32, whose reciprocal 2**126
#: is exact and finite (a subnormal amax / qmax would make 1 / scale overflow and every q saturate)
MIN_SCALE = np.float32(2.0**-126)


def quantize_ref(x: np.ndarray, qname: str, granularity: str = "row") -> tuple[np.ndarray, np.ndarray]:
    """x [M, N] (values of a float32/bf16/fp16 tensor) -> (q [M, N] int8 / ml_dtypes fp8, float32 scale
    [M, 1] | [1, N] | 0-d)."""
    x32 = np.asarray(x).astype(np.float32)
    qmax = np.float32(QMAX[qname])
    axis = _AXIS[granularity]
    with np.errstate(all="ignore"):
        if x32.size == 0:
            amax = np.zeros([1 if axis is None or i == axis else n for i, n in enumerate(x32.shape)], np.float32)
            amax = amax.reshape(()) if axis is None else amax
        else:
            amax = np.max(np.abs(x32), axis=axis, keepdims=axis is not None)  # NaN propagates
        scale = np.asarray(amax / qmax, dtype=np.float32)
        scale = np.where(amax == 0, np.float32(1), np.where(scale < MIN_SCALE, MIN_SCALE, scale)).astype(np.float32)
        inv = (np.float32(1) / scale).astype(np.float32)
        v = (x32 * inv).astype(np.float32)
        v = np.where(np.isnan(v), np.float32(0), v)
        v = np.clip(v, -qmax, qmax)
        if qname == "int8":
            q = np.rint(v).astype(np.int8)
        else:
            q = v.astype(NP_QDTYPE[qname])
    return q, scale.reshape(()) if axis is None else scale


def dequantize_ref(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64 q * scale."""
    return q.astype(np.float64) * np.asarray(scale, np.float64)


def int8_matmul_ref(a_q: np.ndarray, b_q: np.ndarray) -> np.ndarray:
    """Exact int64 a_q @ b_q.T for int8 a_q [M, K], b_q [N, K]."""
    a, b = np.asarray(a_q), np.asarray(b_q)
    if a.shape[0] * b.shape[0] * a.shape[1] <= 10**8:
        return a.astype(np.int64) @ b.astype(np.int64).T
    return (a.astype(np.float64) @ b.astype(np.float64).T).astype(np.int64)  # exact: |sum| < 2**53


def scaled_matmul_ref(a_q: np.ndarray, a_scale, b_q: np.ndarray, b_scale, bias: Optional[np.ndarray] = None,
                      activation: Optional[str] = None) -> np.ndarray:
    """float64 act((a_q @ b_q.T) * a_scale * b_scale + bias); a_scale [M, 1] | [M] | 0-d, b_scale
    [1, N] | [N] | [N, 1] | 0-d; q arrays int8 or ml_dtypes fp8."""
    a, b = np.asarray(a_q), np.asarray(b_q)
    if a.dtype == np.int8:
        acc = int8_matmul_ref(a, b).astype(np.float64)
    else:
        acc = a.astype(np.float64) @ b.astype(np.float64).T
    y = acc * np.asarray(a_scale, np.float64).reshape(-1, 1) * np.asarray(b_scale, np.float64).reshape(1, -1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :]
    return activation_ref(y, activation)


def ffn_ref(x: np.ndarray, w1: np.ndarray, b1: Optional[np.ndarray], w2: np.ndarray, b2: Optional[np.ndarray],
            activation: Optional[str]) -> np.ndarray:
    """float64 act(x @ w1.T + b1) @ w2.T + b2 (nn.Linear layout: w1 [H, D], w2 [O, H])."""
    x, w1, w2 = (np.asarray(t, np.float64) for t in (x, w1, w2))
    h = x @ w1.T + (0.0 if b1 is None else np.asarray(b1, np.float64))
    return activation_ref(h, activation) @ w2.T + (0.0 if b2 is None else np.asarray(b2, np.float64))


def quantized_ffn_ref(x: np.ndarray, w1: np.ndarray, b1, w2: np.ndarray, b2, activation: Optional[str],
                      qname: str) -> np.ndarray:
    """The quantized FFN's arithmetic in NumPy: weights per output channel, activations per token,
    float64 GEMMs and epilogues (no rounding of the hidden layer besides its quantization)."""
    w1_q, w1_s = quantize_ref(w1, qname, "row")
    w2_q, w2_s = quantize_ref(w2, qname, "row")
    x_q, x_s = quantize_ref(x, qname, "row")
    h = scaled_matmul_ref(x_q, x_s, w1_q, w1_s, b1, activation)
    h_q, h_s = quantize_ref(h, qname, "row")
    return scaled_matmul_ref(h_q, h_s, w2_q, w2_s, b2, None)


def sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||ref||^2 / ||out - ref||^2) in dB."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    noise = float(np.sum((out - ref) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf
