"""@triton.jit kernels for grouped (leaf / expert) GEMMs. Launchers are in ops.py, the grouping in grouping.py.

Rows are slots sorted by group (grouping.py): group g owns sorted rows [offsets[g], offsets[g+1]).

- `grouped_gemm_kernel`: one program per (row tile, column block), in GROUP_M-swizzled order
  (DIRECT: per (group, column block) over all slots, for decode sizes: no grouping step at all). The tile's group comes from
  the per-tile map; A rows are gathered inside the loads (row = token of the slot, x[slot // k])
  or read in sorted order (an intermediate that stays grouped); the epilogue adds the group's
  bias, applies the activation (or gated SwiGLU from two accumulators: gate columns n, up columns
  n + up_offset), multiplies by the slot's route weight, and stores either scattered to the slot's
  row or in sorted order. Each output element is written by exactly one program: no atomics.
- `slot_sum_kernel`: y[t] = sum_j buf[t * k + j] in a fixed order (j = 0..k-1), float32 sums, so
  k > 1 results are the same bits run to run.
- `grouped_wgrad_kernel`: dW[g] = sum over g's rows of A_row^T (rw * B_row) and db[g] = sum of
  rw * B_row, one program per (group, D block, N block) looping over the group's rows; rows of A
  and B are gathered or sorted like above. Deterministic (each output owned by one program).
- `leaf_mlp_fused_kernel`: both GEMMs of a leaf MLP whose hidden width fits one register tile
  (FFF leaves, H <= 128): one program per row tile computes the tile's hidden layer, keeps it in
  registers, and sweeps the output columns with it. One launch, no hidden buffer.
- `group_count_kernel`, `group_plan_kernel`, `group_scatter_kernel`: the forward grouping as a
  counting sort (grouping.CountedGrouping): per-group counts by atomics, then offsets and the
  per-tile map from one scan, then each slot's sorted row from an atomic cursor per group. The
  atomics are relaxed: launch boundaries order the steps, and a cursor only needs atomicity.
- `group_sort_kernel`: the same grouping of a small problem (up to 1024 slots and 512 groups) in
  one program: a sort of (group, slot) keys and a histogram, one launch instead of three and a memset.
"""
from __future__ import annotations

from .._triton import HAS_TRITON, jit, tl

if HAS_TRITON:
    from .._triton import apply_activation


@jit
def _mma(acc, a, b, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with float32 accumulation; UPCAST_DOT: exact float32 products (float32 data, or
    the interpreter, which cannot multiply bf16 tiles)."""
    if UPCAST_DOT:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n) in groups of GROUP_M row blocks that sweep all column blocks
    together, so the A rows of a group stay in L2 while the B columns stream (Triton's matmul order)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@jit
def grouped_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, rw_ptr, out_ptr,
    sorted_slot_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr, ids_ptr,
    num_groups, num_slots, num_pid_m, N, K, up_offset,
    stride_am, stride_ak, stride_wg, stride_wk, stride_wn, stride_bg, stride_bn, stride_om, stride_on,
    TOPK: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RW: tl.constexpr, ACT: tl.constexpr, SWIGLU: tl.constexpr, UPCAST_DOT: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    if DIRECT:
        # Decode-size problems (all slots fit one tile): no sorting. Program g takes every slot and
        # masks those routed to group g; groups nobody chose exit before reading their weights.
        # Rows are slots, so "sorted" order is slot order here.
        g = pid_m
        rows = tl.arange(0, BLOCK_M)
        ids = tl.load(ids_ptr + rows, mask=rows < num_slots, other=-1)
        rmask = ids == g
        if tl.sum(rmask.to(tl.int32), axis=0) == 0:
            return
        slot = rows
    else:
        g = tl.load(tile_group_ptr + pid_m)
        if g >= num_groups:  # surplus tile of the upper-bound grid
            return
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(offsets_ptr + g + 1)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        slot = tl.load(sorted_slot_ptr + rows, mask=rmask, other=0)
    if GATHER_A:
        a_rows = slot // TOPK
    else:
        a_rows = rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
    w_base = w_ptr + g.to(tl.int64) * stride_wg
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        a = tl.load(a_base + kk[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        w = tl.load(w_base + kk[:, None] * stride_wk + cols[None, :] * stride_wn, mask=wmask, other=0.0)
        acc = _mma(acc, a, w, UPCAST_DOT)
        if SWIGLU:
            wu = tl.load(w_base + kk[:, None] * stride_wk + (cols + up_offset)[None, :] * stride_wn, mask=wmask, other=0.0)
            acc_up = _mma(acc_up, a, wu, UPCAST_DOT)
    if HAS_BIAS:
        b_base = bias_ptr + g.to(tl.int64) * stride_bg
        acc += tl.load(b_base + cols * stride_bn, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(b_base + (cols + up_offset) * stride_bn, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        acc = apply_activation(acc, 3) * acc_up  # silu(gate) * up
    else:
        acc = apply_activation(acc, ACT)
    if HAS_RW:
        acc = acc * tl.load(rw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if SCATTER_OUT:
        out_rows = slot
    else:
        out_rows = rows
    out_ptrs = out_ptr + out_rows.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@jit
def slot_sum_kernel(buf_ptr, out_ptr, T, N, stride_bm, stride_om,
                    TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = (rows < T)[:, None] & (cols < N)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    base = buf_ptr + (rows.to(tl.int64) * TOPK)[:, None] * stride_bm + cols[None, :]
    for j in tl.static_range(TOPK):  # fixed order: the same bits every run
        acc += tl.load(base + j * stride_bm, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@jit
def grouped_wgrad_kernel(
    a_ptr, b_ptr, rw_ptr, dw_ptr, db_ptr,
    sorted_slot_ptr, offsets_ptr, group_list_ptr,
    num_groups, DA, NB, blocks_d, blocks_n,
    stride_am, stride_ak, stride_bm, stride_bn, stride_wg, stride_wd, stride_wn, stride_dbg, stride_dbn,
    TOPK: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_RW: tl.constexpr,
    HAS_DB: tl.constexpr, COMPACT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    per_group = blocks_d * blocks_n
    gi = pid // per_group  # group-major: a group's rows stay in L2 while its dW blocks are computed
    pid_d, pid_n = _swizzle(pid % per_group, blocks_d, blocks_n, GROUP_M)
    if COMPACT:  # programs only for the non-empty groups (the caller zero-filled dW and db)
        g = tl.load(group_list_ptr + gi)
        if g >= num_groups:
            return
    else:
        g = gi
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dmask = dd < DA
    nmask = nn < NB
    acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        slot = tl.load(sorted_slot_ptr + rows, mask=rmask, other=0)
        if GATHER_A:
            a_rows = slot // TOPK
        else:
            a_rows = rows
        if GATHER_B:
            b_rows = slot // TOPK
        else:
            b_rows = rows
        at = tl.load(a_ptr + a_rows.to(tl.int64)[None, :] * stride_am + dd[:, None] * stride_ak,
                     mask=dmask[:, None] & rmask[None, :], other=0.0)  # [BLOCK_D, BLOCK_R] = A rows transposed
        bt = tl.load(b_ptr + b_rows.to(tl.int64)[:, None] * stride_bm + nn[None, :] * stride_bn,
                     mask=rmask[:, None] & nmask[None, :], other=0.0)
        if HAS_RW:
            rw = tl.load(rw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
            bt = (bt.to(tl.float32) * rw[:, None]).to(bt.dtype)
        acc = _mma(acc, at, bt, UPCAST_DOT)
        if HAS_DB:
            db += tl.sum(bt.to(tl.float32), axis=0)
    w_ptrs = dw_ptr + g.to(tl.int64) * stride_wg + dd[:, None] * stride_wd + nn[None, :] * stride_wn
    tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=dmask[:, None] & nmask[None, :])
    if HAS_DB:
        if pid_d == 0:
            tl.store(db_ptr + g.to(tl.int64) * stride_dbg + nn * stride_dbn, db.to(db_ptr.dtype.element_ty), mask=nmask)


@jit
def leaf_mlp_fused_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, rw_ptr, out_ptr,
    sorted_slot_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr,
    num_groups, D, H, O,
    stride_xm, stride_w1g, stride_w1k, stride_w1n, stride_b1g,
    stride_w2g, stride_w2k, stride_w2n, stride_b2g, stride_om,
    TOPK: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_RW: tl.constexpr,
    ACT: tl.constexpr, SWIGLU: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    g = tl.load(tile_group_ptr + tl.program_id(0))
    if g >= num_groups:  # surplus tile of the upper-bound grid
        return
    row0 = tl.load(tile_row_ptr + tl.program_id(0))
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < tl.load(offsets_ptr + g + 1)
    slot = tl.load(sorted_slot_ptr + rows, mask=rmask, other=0)
    x_base = x_ptr + (slot // TOPK).to(tl.int64)[:, None] * stride_xm
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < H
    g64 = g.to(tl.int64)
    w1_base = w1_ptr + g64 * stride_w1g
    # hidden = act(x_rows @ w1[g] + b1[g]), the whole width H in one [BLOCK_M, BLOCK_H] tile
    hid = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    hid_up = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < D
        a = tl.load(x_base + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & hmask[None, :]
        w = tl.load(w1_base + kk[:, None] * stride_w1k + hh[None, :] * stride_w1n, mask=wmask, other=0.0)
        hid = _mma(hid, a, w, UPCAST_DOT)
        if SWIGLU:
            wu = tl.load(w1_base + kk[:, None] * stride_w1k + (hh + H)[None, :] * stride_w1n, mask=wmask, other=0.0)
            hid_up = _mma(hid_up, a, wu, UPCAST_DOT)
    if HAS_B1:
        hid += tl.load(b1_ptr + g64 * stride_b1g + hh, mask=hmask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            hid_up += tl.load(b1_ptr + g64 * stride_b1g + H + hh, mask=hmask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        hid = apply_activation(hid, 3) * hid_up  # silu(gate) * up
    else:
        hid = apply_activation(hid, ACT)
    # rounded to x's dtype at the same point as the two-launch path's hidden buffer
    hid = tl.where(hmask[None, :], hid, 0.0).to(x_ptr.dtype.element_ty)
    if HAS_RW:
        rw = tl.load(rw_ptr + slot, mask=rmask, other=0.0).to(tl.float32)
    w2_base = w2_ptr + g64 * stride_w2g
    out_rows = out_ptr + slot.to(tl.int64)[:, None] * stride_om
    for n0 in range(0, O, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < O
        w2 = tl.load(w2_base + hh[:, None] * stride_w2k + nn[None, :] * stride_w2n,
                     mask=hmask[:, None] & nmask[None, :], other=0.0)
        y = _mma(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), hid, w2, UPCAST_DOT)
        if HAS_B2:
            y += tl.load(b2_ptr + g64 * stride_b2g + nn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_RW:
            y = y * rw[:, None]
        tl.store(out_rows + nn[None, :], y.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@jit
def _valid_ids(ids_ptr, pid, M, G, BLOCK: tl.constexpr):
    """Slots of block `pid`, their group ids clamped into [0, G) and which of them are real and in range."""
    slot = pid * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + slot, mask=slot < M, other=-1)
    ok = (slot < M) & (ids >= 0) & (ids < G)
    return slot, tl.where(ok, ids, 0).to(tl.int32), ok


@jit
def group_count_kernel(ids_ptr, counts_ptr, M, G, BLOCK: tl.constexpr, SMALL_G: tl.constexpr):
    """counts[g] += number of slots of this block in group g (ids outside [0, G) are not counted).
    SMALL_G (a power of two >= G): the block's counts are summed first, then one atomic per group,
    so that a few hot groups (8 experts) do not serialize thousands of atomics on one address."""
    slot, ids, ok = _valid_ids(ids_ptr, tl.program_id(0), M, G, BLOCK)
    if SMALL_G > 0:
        bins = tl.arange(0, SMALL_G)
        hit = (ids[:, None] == bins[None, :]) & ok[:, None]
        local = tl.sum(hit.to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + bins, local, mask=(bins < G) & (local > 0), sem="relaxed")
    else:
        tl.atomic_add(counts_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=ok, sem="relaxed")


@jit
def _store_group_plan(c, g0, rows_before, tiles_before, surplus_from, surplus_step, offsets_ptr, tile_group_ptr,
                      tile_row_ptr, G, max_tiles, WRITE_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    """Offsets and tile map of groups g0 .. g0 + BLOCK_G - 1, whose counts are `c` [BLOCK_G] (0 past
    G), given the rows and tiles of the groups before g0; tiles surplus_from, surplus_from + surplus_step,
    ... (each a block of BLOCK_G) up to max_tiles are marked with group G."""
    lane = tl.arange(0, BLOCK_G)
    gg = g0 + lane
    gmask = gg < G
    nt = (c + BLOCK_M - 1) // BLOCK_M
    row_end = rows_before + tl.cumsum(c, axis=0)
    row_start = row_end - c
    tile_start = tiles_before + tl.cumsum(nt, axis=0) - nt
    if WRITE_OFFSETS:
        tl.store(offsets_ptr + gg + 1, row_end, mask=gmask)
        tl.store(offsets_ptr + gg, tl.zeros([BLOCK_G], dtype=tl.int32), mask=gg == 0)
    for j in range(0, tl.max(nt, axis=0)):
        m = gmask & (j < nt)
        tl.store(tile_group_ptr + tile_start + j, gg, mask=m)
        tl.store(tile_row_ptr + tile_start + j, row_start + j * BLOCK_M, mask=m)
    surplus = tl.full([BLOCK_G], G, dtype=tl.int32)
    for s0 in range(surplus_from, max_tiles, surplus_step):
        ss = s0 + lane
        tl.store(tile_group_ptr + ss, surplus, mask=ss < max_tiles)


@jit
def group_plan_kernel(counts_ptr, offsets_ptr, tile_group_ptr, tile_row_ptr, G, max_tiles,
                      WRITE_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """From counts [G]: offsets [G + 1] (exclusive scan) and the tile map for tiles of BLOCK_M rows.

    Program p owns groups [p * BLOCK_G, (p + 1) * BLOCK_G). Each program sums the counts before its
    block itself (G / BLOCK_G loads of BLOCK_G each: cheaper than a second launch), then writes its
    groups' offsets and tiles; tiles past the last group's are marked with group G (shared out
    among the programs).
    """
    pid = tl.program_id(0)
    g0 = pid * BLOCK_G
    lane = tl.arange(0, BLOCK_G)
    rows_before = tl.zeros([BLOCK_G], dtype=tl.int32)
    tiles_before = tl.zeros([BLOCK_G], dtype=tl.int32)
    tiles_all = tl.zeros([BLOCK_G], dtype=tl.int32)
    for c0 in range(0, G, BLOCK_G):
        gg = c0 + lane
        c = tl.load(counts_ptr + gg, mask=gg < G, other=0)
        nt = (c + BLOCK_M - 1) // BLOCK_M
        before = gg < g0
        rows_before += tl.where(before, c, 0)
        tiles_before += tl.where(before, nt, 0)
        tiles_all += nt
    c = tl.load(counts_ptr + g0 + lane, mask=g0 + lane < G, other=0)
    _store_group_plan(c, g0, tl.sum(rows_before, axis=0), tl.sum(tiles_before, axis=0),
                      tl.sum(tiles_all, axis=0) + g0, tl.num_programs(0) * BLOCK_G, offsets_ptr, tile_group_ptr,
                      tile_row_ptr, G, max_tiles, WRITE_OFFSETS, BLOCK_M, BLOCK_G)


@jit
def group_sort_kernel(ids_ptr, counts_ptr, offsets_ptr, sorted_slot_ptr, tile_group_ptr, tile_row_ptr, M, G,
                      max_tiles, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """The whole forward grouping of a small problem in one program (M <= BLOCK_S slots, G <= BLOCK_G
    groups): what the count, plan and scatter launches do, in one launch and without atomics.

    Each slot's key is (group, slot), with out-of-range ids and padding lanes given group G, so one
    sort puts every real slot in group order, slot order within a group (stable), and the
    out-of-range ones after offsets[G], where no tile reads them. The counts come from a histogram
    of the in-range ids.
    """
    s = tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + s, mask=s < M, other=-1)
    ok = (s < M) & (ids >= 0) & (ids < G)
    grp = tl.where(ok, ids, G).to(tl.int32)
    key = tl.sort(grp * BLOCK_S + s)
    tl.store(sorted_slot_ptr + s, key % BLOCK_S, mask=s < M)
    c = tl.histogram(grp, BLOCK_G, mask=ok)
    lane = tl.arange(0, BLOCK_G)
    tl.store(counts_ptr + lane, c, mask=lane < G)
    nt = (c + BLOCK_M - 1) // BLOCK_M
    _store_group_plan(c, 0, 0, 0, tl.sum(nt, axis=0), BLOCK_G, offsets_ptr, tile_group_ptr, tile_row_ptr, G,
                      max_tiles, True, BLOCK_M, BLOCK_G)


@jit
def group_scatter_kernel(ids_ptr, offsets_ptr, cursor_ptr, sorted_slot_ptr, M, G,
                         BLOCK: tl.constexpr, SMALL_G: tl.constexpr):
    """sorted_slot[offsets[g] + r] = slot, r = the slot's rank in its group from an atomic cursor.
    SMALL_G: ranks within the block by a running count per group and one atomic per group (the
    block's slots stay in order); else one atomic per slot. Order between blocks is whatever the
    atomics make it; the forward GEMMs compute each row independently, so that changes no bits."""
    slot, ids, ok = _valid_ids(ids_ptr, tl.program_id(0), M, G, BLOCK)
    if SMALL_G > 0:
        bins = tl.arange(0, SMALL_G)
        hit = ((ids[:, None] == bins[None, :]) & ok[:, None]).to(tl.int32)
        local = tl.sum(hit, axis=0)
        base = tl.atomic_add(cursor_ptr + bins, local, mask=(bins < G) & (local > 0), sem="relaxed")
        before = tl.sum(tl.where(hit > 0, tl.cumsum(hit, axis=0) - 1, 0), axis=1)  # earlier slots of its group
        rank = tl.sum(tl.where(hit > 0, base[None, :], 0), axis=1) + before
    else:
        rank = tl.atomic_add(cursor_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=ok, sem="relaxed")
    pos = tl.load(offsets_ptr + ids, mask=ok, other=0) + rank
    tl.store(sorted_slot_ptr + pos, slot, mask=ok)
