"""float64 NumPy references for the grouped (leaf / expert) GEMMs, written from the math of DESIGN.md.

Slots: token t has k slots (t, j) with group ids indices[t, j] and route weights rw[t, j] (1 when
none are given). Each reference loops over the groups actually hit (never over tokens), so it stays
cheap for G = 65536.
"""
from __future__ import annotations

import numpy as np

from .._numpy_ref import activation as _activation


def _slots(x, indices, route_weights):
    x = np.asarray(x, np.float64)
    idx = np.asarray(indices).astype(np.int64).reshape(x.shape[0], -1)
    rw = np.ones(idx.shape) if route_weights is None else np.asarray(route_weights, np.float64).reshape(idx.shape)
    return x, idx, rw


def act_ref(h: np.ndarray, name: str | None) -> np.ndarray:
    """Activation by name; "swiglu" splits the last dim in halves: silu(first half) * second half."""
    if name == "swiglu":
        hh = h.shape[-1] // 2
        return _activation(h[..., :hh], "silu") * h[..., hh:]
    return _activation(h, name)


def gather_matmul_scatter_ref(x, weight, indices, bias=None, route_weights=None, activation_name=None) -> np.ndarray:
    """y[t] = sum_j rw[t, j] * act(x[t] @ weight[g] + bias[g]), g = indices[t, j] (float64 [T, N])."""
    x, idx, rw = _slots(x, indices, route_weights)
    w = np.asarray(weight, np.float64)
    b = None if bias is None else np.asarray(bias, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    for j in range(idx.shape[1]):
        for g in np.unique(idx[:, j]):
            rows = np.nonzero(idx[:, j] == g)[0]
            z = x[rows] @ w[g] + (0.0 if b is None else b[g])
            out[rows] += rw[rows, j, None] * act_ref(z, activation_name)
    return out


def leaf_mlp_ref(x, indices, w1, b1, w2, b2, activation_name="relu", route_weights=None) -> np.ndarray:
    """y[t] = sum_j rw[t, j] * (act(x[t] @ w1[g] + b1[g]) @ w2[g] + b2[g]), g = indices[t, j] (float64 [T, O])."""
    x, idx, rw = _slots(x, indices, route_weights)
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    b1 = None if b1 is None else np.asarray(b1, np.float64)
    b2 = None if b2 is None else np.asarray(b2, np.float64)
    out = np.zeros((x.shape[0], w2.shape[2]))
    for j in range(idx.shape[1]):
        for g in np.unique(idx[:, j]):
            rows = np.nonzero(idx[:, j] == g)[0]
            h = act_ref(x[rows] @ w1[g] + (0.0 if b1 is None else b1[g]), activation_name)
            out[rows] += rw[rows, j, None] * (h @ w2[g] + (0.0 if b2 is None else b2[g]))
    return out
