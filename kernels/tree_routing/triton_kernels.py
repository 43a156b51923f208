"""@triton.jit kernels for tree routing. Launchers (validation, config choice) are in ops.py.

- `tree_walk_kernel`: a block of tokens walks `LEVELS` levels of the heap-ordered tree in one
  launch. The top `DENSE_LEVELS` levels are computed densely as one [BLOCK_T, D] x [D, nodes] tile
  product on the tensor cores (all tokens need the root and its first descendants, so reading
  those node rows as a matrix beats a per-token gather); below that, each level gathers the row of
  each token's node and reduces x * w over D in chunks. Optionally records the path (node id and
  logit per level) for the UltraFastBERT form and the leaf for tree_route, and optionally counts
  the tokens of each leaf (atomics into a zeroed int32 [L]): the first step of grouping tokens by
  leaf for fff_forward's grouped leaves, done while the leaves are in registers.
- `fff_fused_kernel`: decode-size fff_forward (T <= 64): one program per (token, block of outputs)
  routes its token, then runs that leaf's MLP from the leaf weights, with the hidden activations
  kept in registers chunk by chunk (H need not fit at once).
- `path_accumulate_kernel`: y[t] = sum_l act(logit[t, l]) * w_out[node[t, l]] for fff_path_forward.
"""
from __future__ import annotations

from .._triton import HAS_TRITON, jit, tl

if HAS_TRITON:
    from .._triton import apply_activation


@jit
def _gather_logits(x_ptr, stride_x, rows, rmask, w_ptr, stride_w, b_ptr, node, D,
                   HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """logit[t] = x[rows[t]] . w[node[t]] (+ b[node[t]]) in float32, D reduced in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    w_row = w_ptr + node.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (dd < D)[None, :]
        xv = tl.load(x_row + dd[None, :], mask=m, other=0.0).to(tl.float32)
        wv = tl.load(w_row + dd[None, :], mask=m, other=0.0).to(tl.float32)
        acc += xv * wv
    logit = tl.sum(acc, axis=1)
    if HAS_BIAS:
        logit += tl.load(b_ptr + node, mask=rmask, other=0.0).to(tl.float32)
    return logit


@jit
def tree_walk_kernel(x_ptr, w_ptr, b_ptr, leaf_ptr, path_node_ptr, path_logit_ptr, count_ptr,
                     T, D, stride_x, stride_w,
                     LEVELS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     STORE_LEAF: tl.constexpr, STORE_PATH: tl.constexpr, COUNT_LEAVES: tl.constexpr,
                     DENSE_LEVELS: tl.constexpr, DENSE_COLS: tl.constexpr, UPCAST_DOT: tl.constexpr,
                     RESIDENT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    # RESIDENT (BLOCK_D >= D, decided by the launcher): the x tile is loaded once and stays in
    # registers for every level (x is read from memory exactly once); otherwise each level streams
    # x in BLOCK_D chunks.
    if RESIDENT:
        dd_all = tl.arange(0, BLOCK_D)
        x_res = tl.load(x_rows + dd_all[None, :], mask=rmask[:, None] & (dd_all < D)[None, :], other=0.0)
    node = tl.zeros([BLOCK_T], dtype=tl.int32)
    if DENSE_LEVELS > 0:
        # Logits of all nodes of the top DENSE_LEVELS levels: [BLOCK_T, D] @ [D, DENSE_COLS].
        n_dense: tl.constexpr = 2**DENSE_LEVELS - 1
        cols = tl.arange(0, DENSE_COLS)
        cmask = cols < n_dense
        acc = tl.zeros([BLOCK_T, DENSE_COLS], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            if RESIDENT:
                xt = x_res
            else:
                xt = tl.load(x_rows + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            wt = tl.load(w_ptr + cols[None, :] * stride_w + dd[:, None],
                         mask=cmask[None, :] & dmask[:, None], other=0.0)
            if UPCAST_DOT:  # float32 operands, exact products (float32 inputs, or the interpreter)
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:  # bf16/fp16 operands on the tensor cores, float32 accumulation
                acc += tl.dot(xt, wt)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        for lvl in tl.static_range(DENSE_LEVELS):
            logit = tl.sum(tl.where(cols[None, :] == node[:, None], acc, 0.0), axis=1)
            if STORE_PATH:
                tl.store(path_node_ptr + rows.to(tl.int64) * LEVELS + lvl, node, mask=rmask)
                tl.store(path_logit_ptr + rows.to(tl.int64) * LEVELS + lvl, logit, mask=rmask)
            node = 2 * node + 1 + (logit >= 0).to(tl.int32)
    for lvl in range(DENSE_LEVELS, LEVELS):
        if RESIDENT:
            w_rows = w_ptr + node.to(tl.int64)[:, None] * stride_w
            wv = tl.load(w_rows + dd_all[None, :], mask=rmask[:, None] & (dd_all < D)[None, :], other=0.0)
            logit = tl.sum(x_res.to(tl.float32) * wv.to(tl.float32), axis=1)
            if HAS_BIAS:
                logit += tl.load(b_ptr + node, mask=rmask, other=0.0).to(tl.float32)
        else:
            logit = _gather_logits(x_ptr, stride_x, rows, rmask, w_ptr, stride_w, b_ptr, node, D,
                                   HAS_BIAS, BLOCK_T, BLOCK_D)
        if STORE_PATH:
            tl.store(path_node_ptr + rows.to(tl.int64) * LEVELS + lvl, node, mask=rmask)
            tl.store(path_logit_ptr + rows.to(tl.int64) * LEVELS + lvl, logit, mask=rmask)
        node = 2 * node + 1 + (logit >= 0).to(tl.int32)
    if STORE_LEAF:
        tl.store(leaf_ptr + rows, node - (2**LEVELS - 1), mask=rmask)
    if COUNT_LEAVES:
        tl.atomic_add(count_ptr + node - (2**LEVELS - 1), tl.full([BLOCK_T], 1, tl.int32), mask=rmask, sem="relaxed")


@jit
def fff_fused_kernel(x_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, leaf_ptr,
                     D, H, O, stride_x, stride_nw, stride_y,
                     DEPTH: tl.constexpr, HAS_NB: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                     ACT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr):
    t = tl.program_id(0)
    pid_o = tl.program_id(1)
    one = tl.arange(0, 1)
    rows = t + one
    rmask = one < 1
    node = tl.zeros([1], dtype=tl.int32)
    for lvl in range(DEPTH):
        logit = _gather_logits(x_ptr, stride_x, rows, rmask, nw_ptr, stride_nw, nb_ptr, node, D,
                               HAS_NB, 1, BLOCK_D)
        node = 2 * node + 1 + (logit >= 0).to(tl.int32)
    leaf = tl.sum(node, axis=0) - (2**DEPTH - 1)  # scalar
    if pid_o == 0:
        tl.store(leaf_ptr + t + one, node - (2**DEPTH - 1))
    leaf64 = leaf.to(tl.int64)
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    cmask = cols < O
    x_row = x_ptr + t.to(tl.int64) * stride_x
    w1_leaf = w1_ptr + leaf64 * D * H
    w2_leaf = w2_ptr + leaf64 * H * O
    y = tl.zeros([BLOCK_O], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        hmask = hh < H
        hacc = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            xv = tl.load(x_row + dd, mask=dmask, other=0.0).to(tl.float32)
            w1t = tl.load(w1_leaf + dd[:, None] * H + hh[None, :], mask=dmask[:, None] & hmask[None, :],
                          other=0.0).to(tl.float32)
            hacc += xv[:, None] * w1t
        h = tl.sum(hacc, axis=0)
        if HAS_B1:
            h += tl.load(b1_ptr + leaf64 * H + hh, mask=hmask, other=0.0).to(tl.float32)
        h = tl.where(hmask, apply_activation(h, ACT), 0.0)
        w2t = tl.load(w2_leaf + hh[:, None] * O + cols[None, :], mask=hmask[:, None] & cmask[None, :],
                      other=0.0).to(tl.float32)
        y += tl.sum(h[:, None] * w2t, axis=0)
    if HAS_B2:
        y += tl.load(b2_ptr + leaf64 * O + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=cmask)


@jit
def path_accumulate_kernel(node_ptr, logit_ptr, w_out_ptr, y_ptr, T, O, stride_w, stride_y,
                           LEVELS: tl.constexpr, ACT: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    cmask = cols < O
    m = rmask[:, None] & cmask[None, :]
    y = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for lvl in range(LEVELS):
        node = tl.load(node_ptr + rows.to(tl.int64) * LEVELS + lvl, mask=rmask, other=0)
        a = apply_activation(tl.load(logit_ptr + rows.to(tl.int64) * LEVELS + lvl, mask=rmask, other=0.0), ACT)
        w = tl.load(w_out_ptr + node.to(tl.int64)[:, None] * stride_w + cols[None, :], mask=m, other=0.0)
        y += a[:, None] * w.to(tl.float32)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
