"""Torch fallbacks for tree routing: vectorized, no Python loop over tokens or leaves.

The walk computes the top levels densely (one matmul of x against the first 2**top - 1 nodes;
for 64 tokens or more padded to 2**top columns, a width the CPU BLAS runs far faster than
2**top - 1) and walks them through a successor table (each top node's next node given its logit's
sign): one gather a level. Below the top, each level needs one dot product per token with its own
node's row: on the CPU a sampled dense-dense matmul (torch.sparse.sampled_addmm with one entry per
token) computes exactly those dots without building a [T, D] tensor of gathered node rows; small
batches and other devices gather the rows, which costs less at that size.

`top` is picked per call (_dense_levels): the whole tree for a few tokens, where one small matmul
beats a handful of per-level ops, down to 4 levels for large batches, where the dense matmul's
work doubles with each level. Measured on the 2-core CPU machine, D=768 depth 8 float32, the
previous walk (grouping tokens by 4-level subtree and a batched matmul per stage) against this one:
T=4096 7.3 -> 4.0 ms, T=256 3.3 -> 1.0 ms, T=1 0.58 -> 0.43 ms. Logits are computed in float32.

Leaf MLPs run through the grouped-GEMM family's fallback (grouped_gemm/fallback.py: leaf_mlp_torch).
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from .._backend import torch_activation
from ..grouped_gemm.fallback import leaf_mlp_torch

#: tokens from which the CPU walk uses the sampled matmul for a level's gathered dots, and pads the
#: dense top matmul to a power-of-two width (below it, copying the node rows costs more than it saves)
SAMPLED_DOT_MIN_TOKENS = 64


@functools.lru_cache(maxsize=None)
def _quiet_sparse_beta_warning() -> None:
    """torch warns once per process that sparse CSR tensors are in beta (the ops used here are
    stable): raise that warning here, once, with warnings silenced, instead of filtering every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), torch.tensor([]), size=(1, 1))


def _dense_levels(tokens: int, levels: int) -> int:
    """Levels computed by the dense top matmul: all of a small tree for a few tokens, 4 for large
    batches (about T * 2**top <= 2**14, between 4 and 8 levels)."""
    return min(levels, 8, max(4, int(math.log2(max(1, 2**14 // max(tokens, 1))))))


def gathered_dot(x: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[T]: x[t] . weight[rows[t]] + bias[rows[t]], for float32 x [T, D], weight [N, D], rows [T] int64."""
    t = x.shape[0]
    if x.device.type == "cpu" and t >= SAMPLED_DOT_MIN_TOKENS:
        values = x.new_zeros(t) if bias is None else bias.index_select(0, rows)
        _quiet_sparse_beta_warning()
        pattern = torch.sparse_csr_tensor(torch.arange(t + 1, device=x.device), rows, values,
                                          size=(t, weight.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, x, weight.t()).values()
    dot = (x * weight.index_select(0, rows)).sum(1)
    return dot if bias is None else dot + bias.index_select(0, rows)


def tree_walk_torch(x: torch.Tensor, node_weight: torch.Tensor, node_bias: torch.Tensor | None,
                    levels: int, record_path: bool = False, top: int | None = None):
    """Walk `levels` levels. Returns (final heap node [T] int64, path nodes [T, levels] | None,
    path logits [T, levels] float32 | None). `top`: levels computed densely (default: _dense_levels)."""
    t, d = x.shape
    dev = x.device
    xf, wf = x.float(), node_weight.float()
    bf = None if node_bias is None else node_bias.float()
    top = _dense_levels(t, levels) if top is None else min(top, levels)
    path_nodes = torch.empty(t, levels, dtype=torch.int64, device=dev) if record_path else None
    path_logits = torch.empty(t, levels, dtype=torch.float32, device=dev) if record_path else None
    node = torch.zeros(t, 1, dtype=torch.int64, device=dev)
    if top:
        n_top = 2**top - 1  # the top subtree's nodes are heap ids 0 .. n_top - 1: column j is node j
        w_top, b_top = wf[:n_top], None if bf is None else bf[:n_top]
        if t >= SAMPLED_DOT_MIN_TOKENS:  # pad to 2**top columns (copying the rows costs more for a few tokens)
            w_top = torch.cat([w_top, wf.new_zeros(1, d)])
            b_top = None if bf is None else torch.cat([b_top, bf.new_zeros(1)])
        top_logits = xf @ w_top.t() if b_top is None else torch.addmm(b_top, xf, w_top.t())
        # every top node's successor at once (its right child where its logit >= 0): one gather a level
        successor = (top_logits >= 0).long().add_(torch.arange(1, 2 * top_logits.shape[1], 2, device=dev))
        for level in range(top):
            if record_path:
                path_nodes[:, level], path_logits[:, level] = node[:, 0], top_logits.gather(1, node)[:, 0]
            node = successor.gather(1, node)
    node = node[:, 0]
    for level in range(top, levels):
        logit = gathered_dot(xf, node, wf, bf)
        if record_path:
            path_nodes[:, level], path_logits[:, level] = node, logit
        node = 2 * node + 1 + (logit >= 0)
    return node, path_nodes, path_logits


def tree_route_torch(x, node_weight, node_bias):
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    node, _, _ = tree_walk_torch(x, node_weight, node_bias, depth)
    return (node - (2**depth - 1)).to(torch.int32)


def fff_forward_torch(x, node_weight, node_bias, w1, b1, w2, b2, activation):
    leaf = tree_route_torch(x, node_weight, node_bias)
    return leaf_mlp_torch(x, leaf.long(), w1, b1, w2, b2, activation), leaf


def fff_path_forward_torch(x, w_in, w_out, b_in, activation):
    levels = (w_in.shape[0] + 1).bit_length() - 1
    _, nodes, logits = tree_walk_torch(x, w_in, b_in, levels, record_path=True)
    coeff = torch_activation(logits, activation)
    # a weighted sum of gathered w_out rows without materializing [T, levels, O]
    y = F.embedding_bag(nodes, w_out.float(), per_sample_weights=coeff, mode="sum")
    return y.to(x.dtype), nodes.to(torch.int32)
