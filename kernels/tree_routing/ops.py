"""Public tree-routing ops: validation, backend dispatch, Triton launchers, torch.library registration.

Each op is a `torch.library.custom_op` (`tritonlab::tree_route`, `tritonlab::fff_forward`,
`tritonlab::fff_path_forward`) with a fake implementation, so `torch.compile(fullgraph=True)` keeps
it in the graph as one opaque node. The Python wrapper around it validates inputs (names in every
error), flattens leading dims and handles T = 0; the custom op picks the backend and runs.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import torch

from .._accuracy import rel_error, tolerance
from .._backend import (activation_and_grad, cdiv, check_activation, check_backend, check_features, check_optional,
                        check_same_device, check_same_dtype, check_tensor, check_width, dispatch, empty_result,
                        flatten_tokens, new_output, next_pow2, resolve_backend, shared_memory_per_block)
from .._triton import interpreting
from .._tuning import TunableKernel, lookup_config, register
from ..grouped_gemm.grouping import CountedGrouping, sorts_in_one_launch
from ..grouped_gemm.ops import leaf_mlp_in_range, leaf_mlp_triton
from . import fallback, reference
from .triton_kernels import fff_fused_kernel, path_accumulate_kernel, tree_walk_kernel

MAX_DEPTH = 24
#: token counts up to this take the fused route-plus-leaf kernel; larger batches route, then group
DECODE_MAX_TOKENS = 64


# ----------------------------------------------------------------------------- validation

def _tree_depth(name: str, w: torch.Tensor, extra_level: bool = False) -> int:
    """Depth of a heap-ordered tree with w.shape[0] = 2**k - 1 node rows (k = depth, or depth+1)."""
    n = w.shape[0]
    k = (n + 1).bit_length() - 1
    if 2**k - 1 != n or k > MAX_DEPTH + int(extra_level):
        what = "2**(depth+1) - 1" if extra_level else "2**depth - 1"
        raise ValueError(f"{name} must have {what} rows (a full binary tree, depth <= {MAX_DEPTH}), got {n}")
    return k


def _check_tree_inputs(x, node_weight, node_bias, w_name="node_weight", b_name="node_bias", extra_level=False):
    check_tensor("x", x)
    check_features("x", x)
    check_tensor(w_name, node_weight, ndim=2)
    if extra_level and node_weight.shape[0] == 0:
        raise ValueError(f"{w_name} must have 2**(depth+1) - 1 >= 1 rows (the root at least), got 0")
    levels = _tree_depth(w_name, node_weight, extra_level)
    if node_weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{w_name} has width {node_weight.shape[1]} but x has last dim {x.shape[-1]}")
    check_optional(b_name, node_bias, (node_weight.shape[0],))
    check_same_dtype(x, **{w_name: node_weight, b_name: node_bias})
    return levels


# ----------------------------------------------------------------------------- configs

def _route_default(shape) -> dict:
    t, d, depth = shape["T"], shape["D"], shape["depth"]
    if t >= 256 and next_pow2(d) <= 1024:  # x tile resident in registers, top 4 levels as one tile product
        return {"BLOCK_T": 16, "BLOCK_D": max(16, next_pow2(d)), "DENSE_LEVELS": min(depth, 4), "num_warps": 8}
    return {"BLOCK_T": 32 if t >= 4096 else 16, "BLOCK_D": max(16, min(128, next_pow2(d))),
            "DENSE_LEVELS": min(depth, 4) if t >= 256 else 0, "num_warps": 4}


def _route_space(shape) -> list[dict]:
    d, depth = shape["D"], shape["depth"]
    resident = max(16, next_pow2(d))
    out = []
    # 7 and 8 dense levels (127 / 255 node columns) make most of a depth-8 walk one tensor-core
    # product (6.4 GFLOP at T = 16384, D = 768), instead of per-token gathers of node rows from L2;
    # their weight tiles only fit streamed (BLOCK_D <= 128, see _route_smem)
    for bt, bd, dl, nw in itertools.product((16, 32, 64), (32, 64, 128, 256, resident), (0, 2, 3, 4, 5, 6, 7, 8), (4, 8)):
        if bd > resident or dl > depth or bt * bd > 16384:  # larger register tiles spill
            continue
        if dl >= 7 and (bd > 128 or bt * 2**dl > 64 * 128 * (nw // 4)):  # the [BLOCK_T, 2**dl] accumulator spills
            continue
        cfg = {"BLOCK_T": bt, "BLOCK_D": bd, "DENSE_LEVELS": dl, "num_warps": nw}
        if cfg not in out:
            out.append(cfg)
    return out


def _route_smem(shape, cfg, dtype) -> int:
    """Shared memory of tree_walk_kernel: the dense top levels' dot stages its x tile and its
    [BLOCK_D, DENSE_COLS] node-weight tile, pipelined. Upper bound of the sm_90 builds (Triton 3.6,
    `tritonlab compile-check --configs all`): three stages of both tiles when x streams; when x is
    resident, the x tile once and two of the weight tile (T=16384 D=768: BLOCK_D=1024 with 6 dense
    levels needs 288 KB, more than the 227 KB a block can have)."""
    if not cfg.get("DENSE_LEVELS"):
        return 0
    elem = dtype.itemsize  # not a tensor: this runs on every launch
    bt, bd = cfg["BLOCK_T"], cfg["BLOCK_D"]
    cols = max(16, next_pow2(2 ** cfg["DENSE_LEVELS"] - 1))
    if bd >= shape["D"]:
        return (bt * bd + 2 * bd * cols) * elem
    return 3 * (bt * bd + bd * cols) * elem


def _fit_shared_memory(cfg: dict, d: int, dtype: torch.dtype, limit: Optional[int]) -> dict:
    """The config, or one that fits the GPU's shared memory per block: x streamed in 128-wide chunks
    instead of resident, then fewer dense levels. The defaults are sized for the H100 and bf16; in
    fp32 the resident default needs 192 KB, more than an A100 (163 KB) or an L4 (99 KB) has."""
    if limit is None or _route_smem({"D": d}, cfg, dtype) <= limit:
        return cfg
    cfg = dict(cfg, BLOCK_D=min(cfg["BLOCK_D"], 128))
    while cfg["DENSE_LEVELS"] > 0 and _route_smem({"D": d}, cfg, dtype) > limit:
        cfg["DENSE_LEVELS"] -= 1
    return cfg


def _fused_default(shape) -> dict:
    return {"BLOCK_D": max(16, min(64, next_pow2(shape["D"]))), "BLOCK_H": max(16, min(32, next_pow2(shape["H"]))),
            "BLOCK_O": max(16, min(128, next_pow2(shape["O"]))), "num_warps": 4}


def _fused_space(shape) -> list[dict]:
    out = []
    # narrow tiles only where the problem is that narrow (else the space would be empty)
    narrow_d, narrow_o = (16,) if shape["D"] <= 16 else (), (16, 32) if shape["O"] <= 32 else ()
    for bd, bh, bo, nw in itertools.product(narrow_d + (32, 64, 128), (16, 32, 64), narrow_o + (64, 128, 256), (2, 4, 8)):
        if bd > max(16, next_pow2(shape["D"])) or bh > max(16, next_pow2(shape["H"])) or bo > max(16, next_pow2(shape["O"])):
            continue
        if bd * bh > 8192 or bh * bo > 16384:  # register tiles beyond this spill
            continue
        out.append({"BLOCK_D": bd, "BLOCK_H": bh, "BLOCK_O": bo, "num_warps": nw})
    if shape["T"] > 1:  # the alternative the tuner weighs: route all tokens, then the leaves as a group
        out.append({"GROUPED": 1})
    return out


# ----------------------------------------------------------------------------- Triton launchers

def _walk_triton(x, w, b, levels: int, store_leaf: bool, store_path: bool, config: Optional[dict] = None,
                 leaf_counts: Optional[torch.Tensor] = None):
    """One launch walks every level; `leaf_counts` (zeroed int32 [2**levels]) gets each leaf's token count added."""
    t, d = x.shape
    cfg = config or lookup_config("tree_route", {"T": t, "D": d, "depth": levels}, x.dtype, x.device)
    cfg = _fit_shared_memory(cfg, d, x.dtype, shared_memory_per_block(x.device))
    dense = min(cfg["DENSE_LEVELS"], levels)
    leaf = new_output((t,), torch.int32, x.device) if store_leaf else x
    path_nodes = new_output((t, levels), torch.int32, x.device) if store_path else x
    path_logits = new_output((t, levels), torch.float32, x.device) if store_path else x
    grid = (cdiv(t, cfg["BLOCK_T"]),)
    tree_walk_kernel[grid](
        x, w, w if b is None else b, leaf, path_nodes, path_logits, leaf if leaf_counts is None else leaf_counts,
        t, d, x.stride(0), w.stride(0),
        LEVELS=levels, HAS_BIAS=b is not None, STORE_LEAF=store_leaf, STORE_PATH=store_path,
        COUNT_LEAVES=leaf_counts is not None,
        DENSE_LEVELS=dense, DENSE_COLS=max(16, next_pow2(2**dense - 1)),
        UPCAST_DOT=(x.dtype == torch.float32 or interpreting()), RESIDENT=cfg["BLOCK_D"] >= d,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return leaf, path_nodes, path_logits


def _fff_small_batch(x, nw, nb, w1, b1, w2, b2, activation, config: Optional[dict] = None):
    """T <= DECODE_MAX_TOKENS: the fused route-plus-leaf kernel, unless the tuned config for this
    shape says the grouped path (route, then the leaves as one grouped computation) is faster."""
    t, d = x.shape
    depth = (nw.shape[0] + 1).bit_length() - 1
    shape = {"T": t, "D": d, "H": w1.shape[2], "O": w2.shape[2], "depth": depth}
    cfg = config or lookup_config("fff_decode", shape, x.dtype, x.device)
    if cfg.get("GROUPED"):
        return _fff_grouped(x, nw, nb, w1, b1, w2, b2, activation, count_leaves=False)
    return _fff_fused_triton(x, nw, nb, w1, b1, w2, b2, activation, cfg)


def _fff_grouped(x, nw, nb, w1, b1, w2, b2, activation, count_leaves: bool = True):
    """Route every token (one launch), then the leaves as one grouped computation (grouped_gemm's
    leaf_mlp Triton path; no host sync). count_leaves: the walk also counts tokens per leaf, the
    counting sort's first step without a launch of its own (large batches; decode sizes take the
    sort-free plan, and small ones the one-launch sort, neither of which needs counts)."""
    depth = (nw.shape[0] + 1).bit_length() - 1
    state = None
    if depth == 0:
        leaf = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    else:
        count_leaves = count_leaves and not sorts_in_one_launch(x.shape[0], 2**depth)
        state = CountedGrouping.new_state(2**depth, x.device) if count_leaves else None
        leaf = _walk_triton(x, nw, nb, depth, store_leaf=True, store_path=False,
                            leaf_counts=None if state is None else state[: 2**depth])[0]
    return leaf_mlp_triton(x, leaf.view(-1, 1), w1, b1, w2, b2, activation, grouping_state=state), leaf


def _fff_fused_triton(x, nw, nb, w1, b1, w2, b2, activation, cfg: dict):
    t, d = x.shape
    depth = (nw.shape[0] + 1).bit_length() - 1
    h, o = w1.shape[2], w2.shape[2]
    y = new_output((t, o), x.dtype, x.device)
    leaf = new_output((t,), torch.int32, x.device)
    grid = (t, cdiv(o, cfg["BLOCK_O"]))
    fff_fused_kernel[grid](
        x, nw, x if nb is None else nb, w1, x if b1 is None else b1, w2, x if b2 is None else b2, y, leaf,
        d, h, o, x.stride(0), nw.stride(0), y.stride(0),
        DEPTH=depth, HAS_NB=nb is not None, HAS_B1=b1 is not None, HAS_B2=b2 is not None,
        ACT=check_activation(activation), BLOCK_D=cfg["BLOCK_D"], BLOCK_H=cfg["BLOCK_H"], BLOCK_O=cfg["BLOCK_O"],
        num_warps=cfg["num_warps"])
    return y, leaf


def _path_forward_triton(x, w_in, w_out, b_in, activation):
    t = x.shape[0]
    o = w_out.shape[1]
    levels = (w_in.shape[0] + 1).bit_length() - 1
    _, nodes, logits = _walk_triton(x, w_in, b_in, levels, store_leaf=False, store_path=True)
    y = new_output((t, o), x.dtype, x.device)
    block_t, block_o = 16, max(16, min(128, next_pow2(o)))
    grid = (cdiv(t, block_t), cdiv(o, block_o))
    path_accumulate_kernel[grid](nodes, logits, w_out, y, t, o, w_out.stride(0), y.stride(0),
                                 LEVELS=levels, ACT=check_activation(activation),
                                 BLOCK_T=block_t, BLOCK_O=block_o, num_warps=4)
    return y, nodes


# ----------------------------------------------------------------------------- custom ops

def _tree_route_impl(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor],
                   backend: str) -> torch.Tensor:
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    if depth == 0:
        return torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    if resolve_backend(backend, x.device) == "triton":
        return _walk_triton(x, node_weight, node_bias, depth, store_leaf=True, store_path=False)[0]
    return fallback.tree_route_torch(x, node_weight, node_bias)


_tree_route_op = torch.library.custom_op("tritonlab::tree_route", _tree_route_impl, mutates_args=())


@_tree_route_op.register_fake
def _(x, node_weight, node_bias, backend):
    return x.new_empty(x.shape[0], dtype=torch.int32)


def _fff_forward_impl(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor],
                    w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                    activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if resolve_backend(backend, x.device) == "torch":
        return fallback.fff_forward_torch(x, node_weight, node_bias, w1, b1, w2, b2, activation)
    if x.shape[0] <= DECODE_MAX_TOKENS:
        return _fff_small_batch(x, node_weight, node_bias, w1, b1, w2, b2, activation)
    return _fff_grouped(x, node_weight, node_bias, w1, b1, w2, b2, activation)


_fff_forward_op = torch.library.custom_op("tritonlab::fff_forward", _fff_forward_impl, mutates_args=())


@_fff_forward_op.register_fake
def _(x, node_weight, node_bias, w1, b1, w2, b2, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[2]), x.new_empty(x.shape[0], dtype=torch.int32)


def _fff_path_forward_impl(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b_in: Optional[torch.Tensor],
                         activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, the visited nodes [T, levels]): the backward differentiates along the path the forward
    took, which a second walk could leave where a logit is within rounding of 0."""
    if resolve_backend(backend, x.device) == "triton":
        return _path_forward_triton(x, w_in, w_out, b_in, activation)
    return fallback.fff_path_forward_torch(x, w_in, w_out, b_in, activation)


_fff_path_forward_op = torch.library.custom_op("tritonlab::fff_path_forward", _fff_path_forward_impl, mutates_args=())


@_fff_path_forward_op.register_fake
def _(x, w_in, w_out, b_in, activation, backend):
    levels = (w_in.shape[0] + 1).bit_length() - 1
    return x.new_empty(x.shape[0], w_out.shape[1]), x.new_empty(x.shape[0], levels, dtype=torch.int32)


def _path_setup_context(ctx, inputs, output):
    x, w_in, w_out, b_in, activation, backend = inputs
    ctx.save_for_backward(x, w_in, w_out, b_in, output[1])
    ctx.activation = activation


def _path_backward(ctx, grad, _grad_nodes):
    """Gradients of y = sum_l act(logit_l) w_out[node_l] through the logits (the path itself, a
    piecewise-constant choice, has zero derivative), along the nodes the forward visited; the
    logits are recomputed there and every sum runs per level, vectorized over tokens, in float32
    on any backend."""
    x, w_in, w_out, b_in, nodes = ctx.saved_tensors
    levels = nodes.shape[1]
    dy, xf, wi, wo = grad.float(), x.float(), w_in.float(), w_out.float()
    bi = None if b_in is None else b_in.float()
    nodes = nodes.long()
    logits = torch.stack([fallback.gathered_dot(xf, nodes[:, lvl], wi, bi) for lvl in range(levels)], 1)
    coeff, slope = activation_and_grad(logits, ctx.activation)
    dx, dw_in, dw_out = torch.zeros_like(xf), torch.zeros_like(wi), torch.zeros_like(wo)
    db_in = torch.zeros(w_in.shape[0], dtype=torch.float32, device=x.device)
    for lvl in range(levels):
        node = nodes[:, lvl]
        dlogit = (dy * wo.index_select(0, node)).sum(1)  # d loss / d act(logit)
        if slope is not None:
            dlogit = dlogit * slope[:, lvl]
        dx += dlogit[:, None] * wi.index_select(0, node)
        dw_in.index_add_(0, node, dlogit[:, None] * xf)
        db_in.index_add_(0, node, dlogit)
        dw_out.index_add_(0, node, coeff[:, lvl, None] * dy)
    return (dx.to(x.dtype), dw_in.to(w_in.dtype), dw_out.to(w_out.dtype),
            None if b_in is None else db_in.to(b_in.dtype), None, None)


_fff_path_forward_op.register_autograd(_path_backward, setup_context=_path_setup_context)


# ----------------------------------------------------------------------------- public API

def tree_route(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor] = None,
               *, backend: str = "auto") -> torch.Tensor:
    """Leaf index of each token in a heap-ordered binary tree of node neurons.

    Args:
        x: [..., D] float32/float16/bfloat16 tokens.
        node_weight: [2**depth - 1, D] node neurons in heap order (node i has children 2i+1, 2i+2).
        node_bias: optional [2**depth - 1].
        backend: "auto" | "triton" | "torch" (see DESIGN.md).
    Returns:
        int32 [...]: leaf in [0, 2**depth). At node i the token goes right (2i+2) when
        x . node_weight[i] + node_bias[i] >= 0, else left. Logits are accumulated in float32.
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    _check_tree_inputs(x, node_weight, node_bias)
    x2, lead = flatten_tokens("x", x)
    check_same_device(x=x, node_weight=node_weight, node_bias=node_bias)
    if x2.shape[0] == 0:
        return torch.zeros(lead, dtype=torch.int32, device=x.device)
    out = dispatch(_tree_route_op, _tree_route_impl, x2, node_weight.contiguous(),
                   None if node_bias is None else node_bias.contiguous(), backend)
    return out.reshape(lead)


def fff_forward(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor],
                w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                activation: Optional[str] = "relu", *, return_leaf_counts: bool = False, backend: str = "auto"):
    """Fast Feedforward layer (hard routing): each token runs only its leaf's MLP.

    Args:
        x: [..., D] float32/float16/bfloat16.
        node_weight: [2**depth - 1, D]; node_bias: [2**depth - 1] or None (routing as in tree_route).
        w1: [L, D, H], b1: [L, H] or None, w2: [L, H, O], b2: [L, O] or None, with L = 2**depth.
        activation: "relu" | "gelu" | "gelu_tanh" | "silu" | None.
        return_leaf_counts: also return int64 [L], the number of tokens routed to each leaf (the
            load-balance statistic of Charalampopoulos et al.).
    Returns:
        [..., O] in x's dtype: act(x @ w1[l] + b1[l]) @ w2[l] + b2[l] for each token's leaf l
        (float32 accumulation); with return_leaf_counts, (y, counts).

    Small batches (T <= 64) run one fused route-plus-leaf kernel; larger ones route, then run the
    leaves as a grouped computation. Differentiable in x, w1, b1, w2 and b2 (through the leaves, as
    leaf_mlp); the hard route has zero derivative, so node_weight and node_bias get no gradient
    (FastFeedForward trains the tree through its soft form).
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    depth = _check_tree_inputs(x, node_weight, node_bias)
    if not isinstance(return_leaf_counts, bool):
        raise TypeError(f"return_leaf_counts must be a bool, got {type(return_leaf_counts).__name__}")
    n_leaves = 2**depth
    check_tensor("w1", w1, ndim=3)
    check_tensor("w2", w2, ndim=3)
    d = x.shape[-1]
    if w1.shape[0] != n_leaves or w2.shape[0] != n_leaves:
        raise ValueError(f"w1 and w2 must have 2**depth = {n_leaves} leaves (dim 0), got {w1.shape[0]} and {w2.shape[0]}")
    if w1.shape[1] != d:
        raise ValueError(f"w1 must be [L, D={d}, H], got {tuple(w1.shape)}")
    h, o = w1.shape[2], w2.shape[2]
    check_width("w1", h, "a hidden width H (dim 2)")
    check_width("w2", o, "an output width O (dim 2)")
    if w2.shape[1] != h:
        raise ValueError(f"w2 must be [L, H={h}, O] to match w1, got {tuple(w2.shape)}")
    check_optional("b1", b1, (n_leaves, h))
    check_optional("b2", b2, (n_leaves, o))
    check_same_dtype(x, w1=w1, b1=b1, w2=w2, b2=b2)
    check_activation(activation)
    check_same_device(x=x, node_weight=node_weight, node_bias=node_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    x2, lead = flatten_tokens("x", x)
    if x2.shape[0] == 0:
        y = empty_result((*lead, o), x, x, w1, b1, w2, b2)
        leaf = torch.zeros(0, dtype=torch.int64, device=x.device)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)):
        # training through the hard tree: the route (piecewise constant: no gradient reaches the node
        # weights) and then the leaves through leaf_mlp, whose backward gives x, w1, b1, w2 and b2 theirs
        # (the walk's leaves are in range: no index check, no host sync)
        leaf = tree_route(x2, node_weight, node_bias, backend=backend)
        y = leaf_mlp_in_range(x2, leaf, w1, b1, w2, b2, activation, backend).reshape(*lead, o)
    else:
        # only the node parameters can still require grad here, and they get none (the hard route is
        # piecewise constant): all detached, so that a trainable tree with frozen leaves does not make
        # autograd (torch.compile's traced backward) look for a backward of the custom op, which has none
        c = [None if t is None else t.detach().contiguous() for t in (node_weight, node_bias, w1, b1, w2, b2)]
        y, leaf = dispatch(_fff_forward_op, _fff_forward_impl, x2, *c, activation or "none", backend)
        y = y.reshape(*lead, o)
    if not return_leaf_counts:
        return y
    return y, leaf_counts(leaf, n_leaves)


def leaf_counts(leaf: torch.Tensor, n_leaves: int) -> torch.Tensor:
    """int64 [n_leaves]: tokens per leaf. index_add_, not bincount: no host sync on CUDA (bincount
    reads the max) and it runs on the meta device."""
    leaf = leaf.reshape(-1).long()
    return torch.zeros(n_leaves, dtype=torch.int64, device=leaf.device).index_add_(0, leaf, torch.ones_like(leaf))


def fff_path_forward(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b_in: Optional[torch.Tensor] = None,
                     activation: Optional[str] = "gelu", *, backend: str = "auto") -> torch.Tensor:
    """UltraFastBERT's conditional feed-forward: one neuron per node, summed along the path.

    Args:
        x: [..., D]; w_in: [N, D] and w_out: [N, O] with N = 2**(depth+1) - 1 (heap order); b_in: [N] or None.
    Returns:
        [..., O] in x's dtype: sum over the depth+1 nodes n on the token's root-to-leaf path of
        act(logit_n) * w_out[n], where logit_n = x . w_in[n] + b_in[n] also decides the next child
        (>= 0 goes right). Differentiable in x, w_in, w_out and b_in through the logits (the choice
        of path has zero derivative), on every backend.
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    _check_tree_inputs(x, w_in, b_in, "w_in", "b_in", extra_level=True)
    check_tensor("w_out", w_out, ndim=2)
    if w_out.shape[0] != w_in.shape[0]:
        raise ValueError(f"w_out must have one row per node ({w_in.shape[0]}), got {w_out.shape[0]}")
    check_width("w_out", w_out.shape[1], "an output width O (dim 1)")
    check_same_dtype(x, w_out=w_out)
    check_activation(activation)
    check_same_device(x=x, w_in=w_in, w_out=w_out, b_in=b_in)
    x2, lead = flatten_tokens("x", x)
    o = w_out.shape[1]
    if x2.shape[0] == 0:
        return empty_result((*lead, o), x, x, w_in, w_out, b_in)
    y, _ = dispatch(_fff_path_forward_op, _fff_path_forward_impl, x2, w_in.contiguous(), w_out.contiguous(),
                    None if b_in is None else b_in.contiguous(), activation or "none", backend, needs_autograd=True)
    return y.reshape(*lead, o)


# ----------------------------------------------------------------------------- tuning registry

def _route_inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape["T"], shape["D"], generator=g).to(device=device, dtype=dtype)
    w = torch.randn(2 ** shape["depth"] - 1, shape["D"], generator=g).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(2 ** shape["depth"] - 1, generator=g)).to(device=device, dtype=dtype)
    return {"x": x, "w": w, "b": b}


def route_mismatch(x, w, b, leaf) -> float:
    """Fraction of tokens whose leaf differs from the reference, ignoring near-ties (|logit| tiny)."""
    ref = reference.tree_route_ref(*(t.float().cpu().numpy() for t in (x, w, b)))
    margin = reference.route_margin_ref(*(t.float().cpu().numpy() for t in (x, w, b)))
    tie = margin < (1e-2 if x.dtype != torch.float32 else 1e-5)
    wrong = (leaf.cpu().numpy().astype(np.int64) != ref) & ~tie
    return float(wrong.mean()) if wrong.size else 0.0


register(TunableKernel(
    name="tree_route", default=_route_default, space=_route_space, make_inputs=_route_inputs, smem_bytes=_route_smem,
    run=lambda inp, cfg: _walk_triton(inp["x"], inp["w"], inp["b"], inp["w"].shape[0].bit_length(), True, False, cfg)[0],
    error=lambda inp, out: route_mismatch(inp["x"], inp["w"], inp["b"], out),
    tolerance=lambda dtype: 0.0,
    presets={"small": [{"T": 100, "D": 48, "depth": 4}],
             "models": [{"T": 16384, "D": 768, "depth": 8}, {"T": 4096, "D": 1024, "depth": 11},
                        {"T": 64, "D": 768, "depth": 8}],
             "full": [{"T": t, "D": d, "depth": k} for t in (64, 1024, 16384) for d in (768, 4096) for k in (4, 8, 12, 16)]},
))


def _fused_inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    n_leaves, d, h, o = 2 ** shape["depth"], shape["D"], shape["H"], shape["O"]

    def r(*s, scale=1.0):
        return (scale * torch.randn(*s, generator=g)).to(device=device, dtype=dtype)

    return {"x": r(shape["T"], d), "nw": r(n_leaves - 1, d), "nb": r(n_leaves - 1, scale=0.1),
            "w1": r(n_leaves, d, h, scale=d**-0.5), "b1": r(n_leaves, h, scale=0.1),
            "w2": r(n_leaves, h, o, scale=h**-0.5), "b2": r(n_leaves, o, scale=0.1)}


def _fused_error(inp, out) -> float:
    args = [inp[k].float().cpu().numpy() for k in ("x", "nw", "nb", "w1", "b1", "w2", "b2")]
    return rel_error(out, reference.fff_forward_ref(*args, "relu"))


register(TunableKernel(
    name="fff_decode", default=_fused_default, space=_fused_space, make_inputs=_fused_inputs,
    run=lambda inp, cfg: _fff_small_batch(inp["x"], inp["nw"], inp["nb"], inp["w1"], inp["b1"], inp["w2"],
                                          inp["b2"], "relu", cfg)[0],
    error=_fused_error, tolerance=lambda dtype: tolerance(dtype),
    presets={"small": [{"T": 3, "D": 40, "H": 24, "O": 40, "depth": 3}],
             "models": [{"T": 1, "D": 768, "H": 16, "O": 768, "depth": 8}, {"T": 64, "D": 768, "H": 16, "O": 768, "depth": 8},
                        {"T": 16, "D": 4096, "H": 64, "O": 4096, "depth": 6}],
             "full": [{"T": t, "D": d, "H": h, "O": d, "depth": k} for t in (1, 16, 64) for d in (768, 4096)
                      for h in (16, 64, 256) for k in (4, 8, 12)]},
))
