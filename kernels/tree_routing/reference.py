"""float64 NumPy references for tree routing, written from the math of DESIGN.md."""
from __future__ import annotations

import numpy as np

from .._numpy_ref import activation


def _depth_of(n_nodes: int) -> int:
    depth = int(np.log2(n_nodes + 1))
    assert 2**depth - 1 == n_nodes
    return depth


def tree_walk_ref(x: np.ndarray, node_weight: np.ndarray, node_bias: np.ndarray | None, levels: int):
    """Walk `levels` levels from the root. Returns (nodes [T, levels], logits [T, levels], final node [T])."""
    x = np.asarray(x, np.float64)
    w = np.asarray(node_weight, np.float64)
    b = np.zeros(w.shape[0]) if node_bias is None else np.asarray(node_bias, np.float64)
    t = x.shape[0]
    node = np.zeros(t, dtype=np.int64)
    nodes = np.zeros((t, levels), dtype=np.int64)
    logits = np.zeros((t, levels))
    for lvl in range(levels):
        logit = np.einsum("td,td->t", x, w[node]) + b[node]
        nodes[:, lvl], logits[:, lvl] = node, logit
        node = 2 * node + 1 + (logit >= 0)
    return nodes, logits, node


def tree_route_ref(x, node_weight, node_bias=None) -> np.ndarray:
    """Leaf index in [0, 2**depth) of each token (int64 [T])."""
    depth = _depth_of(np.asarray(node_weight).shape[0])
    _, _, node = tree_walk_ref(x, node_weight, node_bias, depth)
    return node - (2**depth - 1)


def route_margin_ref(x, node_weight, node_bias=None) -> np.ndarray:
    """Smallest |logit| met on each token's path, scaled by ||x|| ||w_node|| (float64 [T]).

    Routing is a sign decision: a token whose logit is within rounding of 0 at some node may
    legitimately take either child in finite precision. Tests use this margin to tell such ties
    from real routing errors.
    """
    depth = _depth_of(np.asarray(node_weight).shape[0])
    if depth == 0:
        return np.full(np.asarray(x).shape[0], np.inf)
    nodes, logits, _ = tree_walk_ref(x, node_weight, node_bias, depth)
    w = np.asarray(node_weight, np.float64)
    scale = np.linalg.norm(np.asarray(x, np.float64), axis=1)[:, None] * np.linalg.norm(w[nodes], axis=2)
    return np.min(np.abs(logits) / np.maximum(scale, 1e-300), axis=1)


def fff_forward_ref(x, node_weight, node_bias, w1, b1, w2, b2, activation_name="relu") -> np.ndarray:
    """act(x @ w1[l] + b1[l]) @ w2[l] + b2[l] for each token's leaf l (float64 [T, O])."""
    x = np.asarray(x, np.float64)
    w1, w2 = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
    leaves = tree_route_ref(x, node_weight, node_bias)
    out = np.zeros((x.shape[0], w2.shape[2]))
    for leaf in np.unique(leaves):
        rows = leaves == leaf
        h = x[rows] @ w1[leaf] + (0.0 if b1 is None else np.asarray(b1, np.float64)[leaf])
        out[rows] = activation(h, activation_name) @ w2[leaf] + (0.0 if b2 is None else np.asarray(b2, np.float64)[leaf])
    return out


def fff_path_forward_ref(x, w_in, w_out, b_in=None, activation_name="gelu") -> np.ndarray:
    """UltraFastBERT: sum over the depth+1 path nodes of act(logit_n) * w_out[n] (float64 [T, O])."""
    levels = _depth_of(np.asarray(w_in).shape[0])  # N = 2**(depth+1) - 1 -> depth + 1 levels
    nodes, logits, _ = tree_walk_ref(x, w_in, b_in, levels)
    w_out = np.asarray(w_out, np.float64)
    return np.einsum("tl,tlo->to", activation(logits, activation_name), w_out[nodes])
