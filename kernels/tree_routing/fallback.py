"""Torch fallbacks for tree routing: vectorized, no Python loop over tokens or leaves.

Routing walks the tree in stages of `stage` levels (4 by default). In a stage, each token needs
the 2**stage - 1 nodes of the subtree under its current node; tokens are grouped by that subtree
root and one batched matmul gives every token's logits for its whole subtree at once (16 columns:
15 nodes and a zero pad, a shape the CPU BLAS handles far better than 15). The walk inside the
subtree is then a few gathers on a [T, 16] tensor. So x is read once per 4 levels instead of once
per level, and no [T, D] gather of node rows is ever built. Logits are computed in float32.

Leaf MLPs run through the grouped-GEMM family's fallback (grouped_gemm/fallback.py: leaf_mlp_torch).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._backend import torch_activation
from .._grouping import PaddedGroups
from ..grouped_gemm.fallback import leaf_mlp_torch

ROUTE_STAGE = 4


#: below this many tokens the walk gathers each token's node row level by level (a few tiny ops per
#: level), above it the staged subtree matmuls win
SMALL_BATCH = 128


@functools.lru_cache(maxsize=256)
def _subtree_table(level: int, span: int, pad_index: int, device: torch.device) -> torch.Tensor:
    """[2**level, 2**span] heap ids of the nodes of each subtree rooted at `level` (BFS order, last col = pad)."""
    roots = torch.arange(2**level, device=device) + (2**level - 1)
    cols = []
    for j in range(span):
        i = torch.arange(2**j, device=device)
        cols.append((roots[:, None] + 1) * 2**j - 1 + i[None, :])
    cols.append(torch.full((2**level, 1), pad_index, device=device, dtype=torch.int64))
    return torch.cat(cols, dim=1)


def tree_walk_torch(x: torch.Tensor, node_weight: torch.Tensor, node_bias: torch.Tensor | None,
                    levels: int, record_path: bool = False, stage: int = ROUTE_STAGE):
    """Walk `levels` levels. Returns (final heap node [T] int64, path nodes [T, levels] | None, path logits | None)."""
    t, d = x.shape
    dev = x.device
    n_nodes = node_weight.shape[0]
    xf = x.float()
    w_ext = torch.cat([node_weight.float(), node_weight.new_zeros(1, d, dtype=torch.float32)])
    b_ext = torch.zeros(n_nodes + 1, device=dev) if node_bias is None else torch.cat([node_bias.float(), node_bias.new_zeros(1, dtype=torch.float32)])
    node = torch.zeros(t, dtype=torch.int64, device=dev)
    path_nodes = torch.empty(t, levels, dtype=torch.int64, device=dev) if record_path else None
    path_logits = torch.empty(t, levels, dtype=torch.float32, device=dev) if record_path else None
    if t <= SMALL_BATCH:
        for level in range(levels):
            logit = (xf * node_weight.index_select(0, node).float()).sum(1)
            if node_bias is not None:
                logit += node_bias.index_select(0, node).float()
            if record_path:
                path_nodes[:, level], path_logits[:, level] = node, logit
            node = 2 * node + 1 + (logit >= 0)
        return node, path_nodes, path_logits
    level = 0
    while level < levels:
        span = min(stage, levels - level)
        table = _subtree_table(level, span, n_nodes, dev)
        if level == 0:
            logits = torch.addmm(b_ext[table[0]], xf, w_ext.index_select(0, table[0]).T)
        else:
            groups = PaddedGroups.build(node - (2**level - 1), 2**level, row_bytes=d + 2**span,
                                        group_bytes=d * 2**span)
            ids = groups.per_tile(table)  # [tiles, 2**span]
            w_tiles = w_ext.index_select(0, ids.reshape(-1)).view(*ids.shape, d)
            tiles = torch.bmm(groups.pad(xf), w_tiles.transpose(1, 2)) + b_ext[ids][:, None, :]
            logits = groups.unpad(tiles)
        local = torch.zeros(t, 1, dtype=torch.int64, device=dev)  # BFS index inside the subtree
        for j in range(span):
            logit = logits.gather(1, local).squeeze(1)
            if record_path:
                path_nodes[:, level + j] = (node + 1) * 2**j - 1 + (local.squeeze(1) - (2**j - 1))
                path_logits[:, level + j] = logit
            local = 2 * local + 1 + (logit >= 0).unsqueeze(1)
        node = (node + 1) * 2**span - 1 + (local.squeeze(1) - (2**span - 1))
        level += span
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
    return y.to(x.dtype)
