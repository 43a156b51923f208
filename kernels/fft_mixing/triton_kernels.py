"""@triton.jit kernels for FFT token mixing: DFTs as matrix products (plans.py explains the four-step
factorization, the padded tiles and the convolution modes). Launchers are in ops.py.

- `fused_conv_kernel`: one program per (channel block, batch row) runs the whole circular / causal
  convolution of its columns in registers: forward four-step DFT (the first, real-input stage is 2
  real dots instead of 4), multiply by the kernel spectrum, inverse four-step DFT (the last,
  real-output stage is again 2 dots). The spectrum never leaves registers. N2 = 1 is the dense DFT.
- `dft_axis_kernel`: one forward DFT along an axis in registers (fnet_mix: the real-input DFT
  along D, then the complex-input, real-part-output DFT along S).
- `dft_gemm_kernel`: a DFT along an axis as a tiled GEMM that loops over the summed index, the DFT
  matrix gathered from a unit-circle table at the exact phase (k n) mod L. It serves lengths that do
  not fit in registers: the column passes of the split path (with the twiddle epilogue and the
  convolution modes' addressing) and the dense DFT of awkward fnet lengths.
- `split_rows_kernel`: the split path's row pass: row DFT, multiply by the kernel spectrum, inverse
  row DFT and conjugate twiddles (or, for fnet, the forward row DFT only).
- `spectrum_layout_kernel`: the filter or kernel spectrum in the layout the two paths above read.

Every pointer offset goes through `_offsets`, which widens to int64 before multiplying: program
ids, aranges and int arguments below 2**31 are int32 on a GPU, and int32 products wrap silently
(B * S * D is 805M at B = 64, S = 16384, D = 768, and the fp32 complex scratch doubles it). Index
arithmetic left in int32 stays below a transform length (<= 2**18 on the split path) or one tensor
dim (`ops._check_extents` guards those).

Complex tiles are pairs of float32 tiles (real, imaginary). Dots: PRECISION 0 = fp32 "ieee"
(interpreter), 1 = "tf32x3" (fp32 inputs on a GPU, ~fp32 accuracy), 2 = "tf32" (bf16/fp16 inputs:
~1e-3 per stage, below their own rounding; bf16 operands would cost ~4e-3 per stage and six
stages would exceed the 1e-2 bound, so they are not offered).
"""
from __future__ import annotations

from .._triton import jit, tl

PREC_IEEE, PREC_TF32X3, PREC_TF32 = 0, 1, 2


@jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b with float32 accumulation at the chosen operand precision."""
    if PRECISION == 2:
        return tl.dot(a, b, input_precision="tf32")
    elif PRECISION == 1:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision="ieee")


@jit
def _offsets(i, stride_i, j, stride_j):
    """i * stride_i + j * stride_j in int64 (i, j broadcastable index tiles, maybe int32)."""
    return i.to(tl.int64) * stride_i + j.to(tl.int64) * stride_j


@jit
def _load_block(ptr, R: tl.constexpr, C: tl.constexpr, LD: tl.constexpr):
    """The top-left [R, C] block of a row-major float32 table with LD columns (no mask: tables are padded)."""
    return tl.load(ptr + tl.arange(0, R)[:, None] * LD + tl.arange(0, C)[None, :])


@jit
def _load_mat(ptr, R: tl.constexpr, C: tl.constexpr):
    """A whole [R, C] table."""
    return _load_block(ptr, R, C, C)


@jit
def _to_rows(t, P1: tl.constexpr, P2: tl.constexpr, BD: tl.constexpr):
    """[P1, P2 * BD] (row n1, column n2 * BD + d) -> [P1 * BD, P2] (row n1 * BD + d, column n2)."""
    return tl.reshape(tl.permute(tl.reshape(t, (P1, P2, BD)), (0, 2, 1)), (P1 * BD, P2))


@jit
def _to_cols(t, P1: tl.constexpr, P2: tl.constexpr, BD: tl.constexpr):
    """Inverse of _to_rows."""
    return tl.reshape(tl.permute(tl.reshape(t, (P1, BD, P2)), (0, 2, 1)), (P1, P2 * BD))


@jit
def _rows_to_t(t, P1: tl.constexpr, P2: tl.constexpr, BD: tl.constexpr):
    """[P1 * BD, P2] (row n1 * BD + d, column n2) -> [P2 * BD, P1] (row n2 * BD + d, column n1)."""
    return tl.reshape(tl.permute(tl.reshape(t, (P1, BD, P2)), (2, 1, 0)), (P2 * BD, P1))


@jit
def _twiddle_to_rows(ar, ai, tw_ptr, toff, P1: tl.constexpr, P2: tl.constexpr, BD: tl.constexpr):
    """The four-step middle: (ar + i ai) [P1, P2 * BD] times the twiddles at toff (the table holds
    the P1 * P2 real parts, then the imaginary parts), returned in the row layout of _to_rows."""
    twr = tl.load(tw_ptr + toff)
    twi = tl.load(tw_ptr + P1 * P2 + toff)
    tr = ar * twr - ai * twi
    ti = ar * twi + ai * twr
    return _to_rows(tr, P1, P2, BD), _to_rows(ti, P1, P2, BD)


@jit
def fused_conv_kernel(x_ptr, y_ptr, kr_ptr, ki_ptr, f1_ptr, f2_ptr, tw_ptr,
                      B, S, D, stride_xb, stride_xs, stride_xd, stride_yb, stride_ys, stride_yd, stride_kb,
                      N1: tl.constexpr, N2: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                      MODE: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr,
                      ROW_SLICE: tl.constexpr = 0, HALF_IO: tl.constexpr = 0):
    """y[b, :, d] = IDFT_M(K[:, d] * DFT_M(x[b, :, d] mapped by MODE)) for a block of channels d and
    ROWS consecutive batch rows. x and y are addressed as [B, S, D] through their strides (channels
    contiguous, or the sequence contiguous when the launcher staged them channel-major).

    K ([P1, D, P2] per batch row, stride_kb = 0 when shared) is the kernel spectrum in this kernel's
    layout with the 1/M scale folded in; padded bins are zero.
    MODE 0: circular, M = S; 1: causal, M >= 2S - 1; 2: periodic extension, M >= 2S.
    ROW_SLICE (a tunable, four-step only): 0 multiplies by the whole [P2, P2] row-DFT table; else the
    row DFT, the spectrum multiply and the inverse row DFT run as one loop over ROW_SLICE-bin slices
    of the row spectrum (B = sum over slices c of Y[:, c] conj(F2)[c, :]), so the tables and the
    spectrum are live a slice at a time: fewer registers for a loop (see ops._conv_space).
    HALF_IO (causal, N1 = P1 >= 32; set by the launcher): positions n = n1 * N2 + n2 < S <= M / 2 lie
    in the first P1 / 2 rows n1, so x is loaded and y computed for those rows only: the first
    column DFT multiplies F1[:, :P1/2] by the half tile and the last produces half the rows: half
    the dot work of those two stages (a quarter of the whole at M = 2048 = 64 x 32, half for the
    dense DFT) and half the x and y tiles, with the same result.
    """
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    d0 = pid_d * BLOCK_D
    # natural layout [P1, P2 * BLOCK_D]: row n1, column n2 * BLOCK_D + dd (channels fastest: coalesced);
    # x and y tiles have the first RIO of those rows
    RIO: tl.constexpr = P1 // 2 if HALF_IO else P1
    rows = tl.arange(0, P1)
    rows_io = tl.arange(0, RIO)
    cols = tl.arange(0, P2 * BLOCK_D)
    n2 = cols // BLOCK_D
    d = d0 + cols % BLOCK_D
    n = rows_io[:, None] * N2 + n2[None, :]
    valid = (rows_io < N1)[:, None] & ((n2 < N2) & (d < D))[None, :]
    if MODE == 2:
        src = n % S
        lmask = valid & (n < 2 * S)
        dst = n - S
        smask = valid & (n >= S) & (n < 2 * S)
    else:
        src = n
        lmask = valid & (n < S)
        dst = n
        smask = lmask
    x_off = _offsets(src, stride_xs, d[None, :], stride_xd)
    y_off = _offsets(dst, stride_ys, d[None, :], stride_yd)
    if P2 > 1:
        # the four-step output is produced transposed, [P2 * BLOCK_D, RIO] (row n2 * BLOCK_D + dd,
        # column n1): the permuted tile then feeds the last dot as its A operand (as a B operand,
        # Triton 3.9's tf32 dot-operand pass rejects the shared layout it derives for it)
        t_rows = tl.arange(0, P2 * BLOCK_D)
        t_n2 = t_rows // BLOCK_D
        t_d = d0 + t_rows % BLOCK_D
        t_n = rows_io[None, :] * N2 + t_n2[:, None]
        t_valid = (rows_io < N1)[None, :] & ((t_n2 < N2) & (t_d < D))[:, None]
        if MODE == 2:
            y_off = _offsets(t_n - S, stride_ys, t_d[:, None], stride_yd)
            smask = t_valid & (t_n >= S) & (t_n < 2 * S)
        else:
            y_off = _offsets(t_n, stride_ys, t_d[:, None], stride_yd)
            smask = t_valid & (t_n < S)

    if P2 == 1:
        koff = _offsets(rows[:, None], D, d[None, :], 1)
        kmask = (d < D)[None, :]
    else:
        toff = rows[:, None] * P2 + n2[None, :]
        # rows layout [P1 * BLOCK_D, P2]: row k1 * BLOCK_D + dd, column k2; bin k = k1 + N1 * k2
        q = tl.arange(0, P1 * BLOCK_D)
        k1 = q // BLOCK_D
        dq = d0 + q % BLOCK_D
        k2 = tl.arange(0, P2)
        koff = _offsets((k1.to(tl.int64) * D + dq)[:, None], P2, k2[None, :], 1)
        kmask = (dq < D)[:, None]
        roff = k1[:, None] * P2 + k2[None, :]

    # Tables are loaded where they are used (L1/L2 hits), not held across the whole program: at
    # S = 4096 the live tiles alone would fill the register file.
    for i in range(ROWS):
        b = pid_g * ROWS + i
        live = ((tl.arange(0, 1) + b) < B)[None, :]  # [1, 1]: the interpreter rejects a scalar & tile mask
        b64 = b.to(tl.int64)
        x = tl.load(x_ptr + b64 * stride_xb + x_off, mask=lmask & live, other=0.0).to(tl.float32)
        # column DFTs of a real tile: 2 dots
        ar = _mm(_load_block(f1_ptr, P1, RIO, P1), x, PRECISION)
        ai = _mm(_load_block(f1_ptr + P1 * P1, P1, RIO, P1), x, PRECISION)
        k_base = b64 * stride_kb
        if P2 == 1:
            kr = tl.load(kr_ptr + k_base + koff, mask=kmask & live, other=0.0)
            ki = tl.load(ki_ptr + k_base + koff, mask=kmask & live, other=0.0)
            yr = ar * kr - ai * ki
            yi = ar * ki + ai * kr
            # real part of conj(F1) @ Y: 2 dots
            out = (_mm(_load_block(f1_ptr, RIO, P1, P1), yr, PRECISION)
                   + _mm(_load_block(f1_ptr + P1 * P1, RIO, P1, P1), yi, PRECISION))
        else:
            ar, ai = _twiddle_to_rows(ar, ai, tw_ptr, toff, P1, P2, BLOCK_D)
            if ROW_SLICE == 0:
                # row DFTs (F2 is symmetric: A @ F2), complex: 4 dots
                f2r = _load_mat(f2_ptr, P2, P2)
                f2i = _load_mat(f2_ptr + P2 * P2, P2, P2)
                zr = _mm(ar, f2r, PRECISION) - _mm(ai, f2i, PRECISION)
                zi = _mm(ar, f2i, PRECISION) + _mm(ai, f2r, PRECISION)
                kr = tl.load(kr_ptr + k_base + koff, mask=kmask & live, other=0.0)
                ki = tl.load(ki_ptr + k_base + koff, mask=kmask & live, other=0.0)
                yr = zr * kr - zi * ki
                yi = zr * ki + zi * kr
                # inverse row DFTs: Y @ conj(F2)
                br = _mm(yr, f2r, PRECISION) + _mm(yi, f2i, PRECISION)
                bi = _mm(yi, f2r, PRECISION) - _mm(yr, f2i, PRECISION)
            else:
                br = tl.zeros((P1 * BLOCK_D, P2), dtype=tl.float32)
                bi = tl.zeros((P1 * BLOCK_D, P2), dtype=tl.float32)
                kk = tl.arange(0, P2)
                for c0 in range(0, P2, ROW_SLICE):
                    c = c0 + tl.arange(0, ROW_SLICE)
                    cols_off = kk[:, None] * P2 + c[None, :]  # F2[:, c]
                    fr = tl.load(f2_ptr + cols_off)
                    fi = tl.load(f2_ptr + P2 * P2 + cols_off)
                    zr = _mm(ar, fr, PRECISION) - _mm(ai, fi, PRECISION)
                    zi = _mm(ar, fi, PRECISION) + _mm(ai, fr, PRECISION)
                    kc_off = _offsets((k1.to(tl.int64) * D + dq)[:, None], P2, c[None, :], 1)
                    kr = tl.load(kr_ptr + k_base + kc_off, mask=kmask & live, other=0.0)
                    ki = tl.load(ki_ptr + k_base + kc_off, mask=kmask & live, other=0.0)
                    yr = zr * kr - zi * ki
                    yi = zr * ki + zi * kr
                    rows_off = c[:, None] * P2 + kk[None, :]  # F2[c, :]
                    gr = tl.load(f2_ptr + rows_off)
                    gi = tl.load(f2_ptr + P2 * P2 + rows_off)
                    br += _mm(yr, gr, PRECISION) + _mm(yi, gi, PRECISION)
                    bi += _mm(yi, gr, PRECISION) - _mm(yr, gi, PRECISION)
            rtwr = tl.load(tw_ptr + roff)
            rtwi = tl.load(tw_ptr + P1 * P2 + roff)
            cr = br * rtwr + bi * rtwi  # times conj(twiddle)
            ci = bi * rtwr - br * rtwi
            # real part of (conj(F1) @ C)^T = C^T @ conj(F1) (F1 is symmetric): 2 dots
            out = (_mm(_rows_to_t(cr, P1, P2, BLOCK_D), _load_block(f1_ptr, P1, RIO, P1), PRECISION)
                   + _mm(_rows_to_t(ci, P1, P2, BLOCK_D), _load_block(f1_ptr + P1 * P1, P1, RIO, P1), PRECISION))
        tl.store(y_ptr + b64 * stride_yb + y_off, out.to(y_ptr.dtype.element_ty), mask=smask & live)


@jit
def spectrum_layout_kernel(h_ptr, kr_ptr, ki_ptr, M, N1, N2, K2_STORED, D, stride_hb, stride_ob, stride_k1, stride_k2,
                           stride_d, inv_m, P2: tl.constexpr, BLOCK_D: tl.constexpr, HALF_ROWS: tl.constexpr = 0):
    """The convolution kernels' spectrum from a half spectrum, in one pass: out[k1, k2, d] (strides
    stride_k1/k2/d; the fused kernels' padded [P1, D, P2] or the split path's [N1 // 2 + 1, N2, D]) holds bin
    k = k1 + N1 * k2 of the M-point Hermitian spectrum H / M, zero at padded k1 >= N1 or k2 >= N2.
    Columns k2 < K2_STORED are written (P2 for the padded layout, N2 for the split one, where a
    padded column would land in the next row).
    HALF_ROWS (the split path, which keeps rows k1 <= N1 / 2 of its column spectrum): rows
    0 < k1 < N1 / 2 are doubled, standing for their conjugate rows N1 - k1 too, so that the real
    part of the last column DFT over the kept rows is the whole inverse (ops._launch_split_conv).

    h: float32 pairs of the complex half spectrum [Bh, M // 2 + 1, D] (bins 0..M/2). Bins past M/2
    are conj(H[M - k]); the imaginary parts at DC and Nyquist are dropped (numpy's irfft ignores
    them). One program per (channel block, k1, spectrum batch row); replaces a dozen torch ops
    (extension, scale, permute, pad, real/imag splits) per call.
    """
    pid_d = tl.program_id(0)
    k1 = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    k2 = tl.arange(0, P2)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = k1 + N1 * k2  # < N1 * P2, a few million at most: int32 is safe
    valid = ((k2 < N2) & (k2 * 0 + k1 < N1))[:, None] & (d < D)[None, :]  # the interpreter rejects scalar & tile
    lower = 2 * k <= M
    src = tl.where(lower, k, M - k)
    h_off = pid_b * stride_hb + _offsets(src[:, None], 2 * D, d[None, :], 2)
    re = tl.load(h_ptr + h_off, mask=valid, other=0.0)
    im = tl.load(h_ptr + h_off + 1, mask=valid, other=0.0)
    im = tl.where(((k == 0) | (2 * k == M))[:, None], 0.0, tl.where(lower[:, None], im, -im))
    o_off = pid_b * stride_ob + k1.to(tl.int64) * stride_k1 + _offsets(k2[:, None], stride_k2, d[None, :], stride_d)
    smask = (k2 < K2_STORED)[:, None] & (d < D)[None, :]
    scale = inv_m
    if HALF_ROWS:
        scale = inv_m * (2.0 - ((k1 == 0) | (2 * k1 == N1)).to(tl.float32))
    tl.store(kr_ptr + o_off, re * scale, mask=smask)
    tl.store(ki_ptr + o_off, im * scale, mask=smask)


@jit
def _store_mirrored(y_ptr, base, k, c, L, W, stride_yn, stride_yc, val, keep):
    """The other half of a real 2-D DFT of real data whose columns c are the half spectrum of width W:
    Re Z[-k, W - c] = Re Z[k, c], so val (at bins k [R, C'] of length L, columns c [C']) is stored at
    row (L - k) mod L, column W - c, for the columns W - c the half spectrum lacks (c >= 1, W - c > W // 2)."""
    c_m = W - c
    ok = keep & ((c >= 1) & (c_m > W // 2))[None, :]
    tl.store(y_ptr + base + _offsets((L - k) % L, stride_yn, c_m[None, :], stride_yc), val, mask=ok)


@jit
def strided_copy_kernel(src_ptr, dst_ptr, R, C, stride_sb, stride_sr, stride_sc, stride_db, stride_dr, stride_dc,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[b, r, c] = src[b, r, c] for one [BLOCK_R, BLOCK_C] tile, any strides: with src contiguous
    along c and dst along r it is a tiled transpose, both sides coalesced (Triton stages the tile
    through shared memory), where torch's strided copy runs at a fraction of the bandwidth."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(2).to(tl.int64)
    mask = (r < R)[:, None] & (c < C)[None, :]
    v = tl.load(src_ptr + b * stride_sb + _offsets(r[:, None], stride_sr, c[None, :], stride_sc), mask=mask)
    tl.store(dst_ptr + b * stride_db + _offsets(r[:, None], stride_dr, c[None, :], stride_dc), v, mask=mask)


@jit
def dft_axis_kernel(xr_ptr, xi_ptr, yr_ptr, yi_ptr, f1_ptr, f2_ptr, tw_ptr,
                    C, K_OUT, MIRROR_W, stride_xb, stride_xn, stride_xc, stride_yb, stride_yn, stride_yc,
                    N1: tl.constexpr, N2: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                    COMPLEX_IN: tl.constexpr, COMPLEX_OUT: tl.constexpr, MIRROR: tl.constexpr,
                    BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """out[b, k, c] = sum_n exp(-2 pi i k n / L) in[b, n, c], L = N1 * N2, for a block of columns c.

    COMPLEX_IN: the input is (xr, xi), else real xr. COMPLEX_OUT: store (yr, yi), else only the real part.
    Only bins k < K_OUT are stored. MIRROR: the columns are the half spectrum of real data of width
    MIRROR_W, and the real output's other half is stored too (_store_mirrored).
    """
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    c0 = pid_c * BLOCK_C
    rows = tl.arange(0, P1)
    cols = tl.arange(0, P2 * BLOCK_C)
    n2 = cols // BLOCK_C
    c = c0 + cols % BLOCK_C
    valid = (rows < N1)[:, None] & ((n2 < N2) & (c < C))[None, :]
    n = rows[:, None] * N2 + n2[None, :]
    off = pid_b * stride_xb + _offsets(n, stride_xn, c[None, :], stride_xc)
    xr = tl.load(xr_ptr + off, mask=valid, other=0.0).to(tl.float32)
    f1r = _load_mat(f1_ptr, P1, P1)
    f1i = _load_mat(f1_ptr + P1 * P1, P1, P1)
    if COMPLEX_IN:
        xi = tl.load(xi_ptr + off, mask=valid, other=0.0).to(tl.float32)
        ar = _mm(f1r, xr, PRECISION) - _mm(f1i, xi, PRECISION)
        ai = _mm(f1r, xi, PRECISION) + _mm(f1i, xr, PRECISION)
    else:
        ar = _mm(f1r, xr, PRECISION)
        ai = _mm(f1i, xr, PRECISION)
    if P2 == 1:
        zr = ar
        zi = ai
    else:
        toff = rows[:, None] * P2 + n2[None, :]
        ar, ai = _twiddle_to_rows(ar, ai, tw_ptr, toff, P1, P2, BLOCK_C)
        f2r = _load_mat(f2_ptr, P2, P2)
        f2i = _load_mat(f2_ptr + P2 * P2, P2, P2)
        zr = _to_cols(_mm(ar, f2r, PRECISION) - _mm(ai, f2i, PRECISION), P1, P2, BLOCK_C)
        if COMPLEX_OUT:
            zi = _to_cols(_mm(ar, f2i, PRECISION) + _mm(ai, f2r, PRECISION), P1, P2, BLOCK_C)
        else:
            zi = zr
    # back in the natural layout: row k1, column k2 * BLOCK_C + c; bin k = k1 + N1 * k2
    k = rows[:, None] + N1 * n2[None, :]
    keep = valid & (k < K_OUT)
    out_off = pid_b * stride_yb + _offsets(k, stride_yn, c[None, :], stride_yc)
    tl.store(yr_ptr + out_off, zr.to(yr_ptr.dtype.element_ty), mask=keep)
    if COMPLEX_OUT:
        tl.store(yi_ptr + out_off, zi.to(yi_ptr.dtype.element_ty), mask=keep)
    if MIRROR:
        _store_mirrored(yr_ptr, pid_b * stride_yb, k, c, N1 * N2, MIRROR_W, stride_yn, stride_yc,
                        zr.to(yr_ptr.dtype.element_ty), keep)


@jit
def _conv_address(r, j, S, N2, D, MODE: tl.constexpr, STORE: tl.constexpr):
    """Offsets (in units of channels-rows) and mask of x/y for rows r (n1) and columns j (= n2 * D + d)
    of the split path: position n = r * N2 + n2, mapped as the fused kernel maps it (plans.py)."""
    n2 = j // D
    d = j % D
    n = r[:, None] * N2 + n2[None, :]
    if MODE == 2:
        if STORE:
            pos = n - S
            ok = (n >= S) & (n < 2 * S)
        else:
            pos = n % S
            ok = n < 2 * S
    else:
        pos = n
        ok = n < S
    return _offsets(pos, D, d[None, :], 1), ok


@jit
def dft_gemm_kernel(xr_ptr, xi_ptr, yr_ptr, yi_ptr, circ_ptr, twc_ptr,
                    L, C, S, N2, D, M, ROWS_OUT, ROWS_IN,
                    stride_xb, stride_xn, stride_xc, stride_yb, stride_yn, stride_yc,
                    SIGN: tl.constexpr, COMPLEX_IN: tl.constexpr, COMPLEX_OUT: tl.constexpr,
                    IN_MODE: tl.constexpr, OUT_MODE: tl.constexpr, TWIDDLE: tl.constexpr,
                    NEED_IMAG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, DENSE_TABLE: tl.constexpr = 0):
    """out[b, k, c] = tw(k, c) * sum_{n < L} exp(SIGN 2 pi i k n / L) in[b, n, c] for a [BLOCK_K, BLOCK_C] tile.

    Addressing: IN_MODE / OUT_MODE -1 is a plain strided [L, C] matrix per batch row; 0/1/2 is the
    convolution addressing of x / y (column c = n2 * D + d, sequence position n * N2 + n2, mapped
    by the mode). TWIDDLE multiplies by exp(SIGN 2 pi i (k * (c // D) mod M) / M) (unit circle of M
    at twc). NEED_IMAG = COMPLEX_OUT or TWIDDLE.
    The DFT matrix: DENSE_TABLE: circ is the whole [2, L, L] forward matrix (plans.dft_matrix, L <=
    plans.DENSE_TABLE_MAX), read in contiguous tiles; else circ holds cos and sin of 2 pi j / L, j < L,
    gathered at the phase (k n) mod L: an int64 remainder per matrix element and step, which the
    sm_90 build spends a long instruction sequence on (the same float32 values either way).
    Rows: only output rows k < ROWS_OUT are computed and stored, and the sum runs over input rows
    n < ROWS_IN (both L for a whole DFT; the split convolution's half column spectrum has fewer).
    """
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    kmask = kk < ROWS_OUT
    cmask = cc < C
    kk64 = kk.to(tl.int64)
    acc_r = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    x_base = pid_b * stride_xb
    # input rows n1 of the convolution addressing hold positions n1 * N2 + n2: past the data (S
    # causal, 2S periodic) they are all zero, and the sum stops there (half the work when causal)
    n_end = ROWS_IN
    if IN_MODE == 1:
        n_end = tl.minimum(ROWS_IN, (S + N2 - 1) // N2)
    elif IN_MODE == 2:
        n_end = tl.minimum(ROWS_IN, (2 * S + N2 - 1) // N2)
    for n0 in range(0, n_end, BLOCK_N):
        nn = n0 + tl.arange(0, BLOCK_N)
        nmask = nn < ROWS_IN
        fmask = kmask[:, None] & nmask[None, :]
        if DENSE_TABLE:
            t_off = kk[:, None] * L + nn[None, :]  # < L * L <= 2**20: int32 is safe
            fr = tl.load(circ_ptr + t_off, mask=fmask, other=0.0)
            fi = tl.load(circ_ptr + L * L + t_off, mask=fmask, other=0.0)  # -sin: the forward sign
            if SIGN > 0:
                fi = -fi
        else:
            phase = (kk64[:, None] * nn.to(tl.int64)[None, :]) % L
            fr = tl.load(circ_ptr + phase, mask=fmask, other=0.0)
            fi = tl.load(circ_ptr + L + phase, mask=fmask, other=0.0)
            if SIGN < 0:
                fi = -fi
        if IN_MODE >= 0:
            off, ok = _conv_address(nn, cc, S, N2, D, IN_MODE, False)
            xmask = ok & nmask[:, None] & cmask[None, :]
            off = off * stride_xc
        else:
            off = _offsets(nn[:, None], stride_xn, cc[None, :], stride_xc)
            xmask = nmask[:, None] & cmask[None, :]
        xr = tl.load(xr_ptr + x_base + off, mask=xmask, other=0.0).to(tl.float32)
        if COMPLEX_IN:
            xi = tl.load(xi_ptr + x_base + off, mask=xmask, other=0.0).to(tl.float32)
            acc_r += _mm(fr, xr, PRECISION) - _mm(fi, xi, PRECISION)
            if NEED_IMAG:
                acc_i += _mm(fr, xi, PRECISION) + _mm(fi, xr, PRECISION)
        else:
            acc_r += _mm(fr, xr, PRECISION)
            if NEED_IMAG:
                acc_i += _mm(fi, xr, PRECISION)
    if TWIDDLE:
        n2 = cc // D
        tphase = (kk64[:, None] * n2.to(tl.int64)[None, :]) % M
        tr = tl.load(twc_ptr + tphase)
        ti = tl.load(twc_ptr + M + tphase)
        if SIGN < 0:
            ti = -ti
        tmp = acc_r * tr - acc_i * ti
        acc_i = acc_r * ti + acc_i * tr
        acc_r = tmp
    y_base = pid_b * stride_yb
    if OUT_MODE >= 0:
        off, ok = _conv_address(kk, cc, S, N2, D, OUT_MODE, True)
        ymask = ok & kmask[:, None] & cmask[None, :]
        off = off * stride_yc
    else:
        off = _offsets(kk[:, None], stride_yn, cc[None, :], stride_yc)
        ymask = kmask[:, None] & cmask[None, :]
    tl.store(yr_ptr + y_base + off, acc_r.to(yr_ptr.dtype.element_ty), mask=ymask)
    if COMPLEX_OUT:
        tl.store(yi_ptr + y_base + off, acc_i.to(yi_ptr.dtype.element_ty), mask=ymask)


@jit
def split_rows_kernel(ar_ptr, ai_ptr, kr_ptr, ki_ptr, f2_ptr, twc_ptr, yr_ptr, yi_ptr,
                      N1, N2, D, M, stride_ab, stride_kb, stride_yb, stride_yn, MIRROR_W,
                      P2: tl.constexpr, CHUNK: tl.constexpr, FILTER: tl.constexpr, COMPLEX_OUT: tl.constexpr,
                      NEED_IMAG: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                      MIRROR: tl.constexpr = False):
    """Row pass of the split path on A[b, k1, n2, d] (fp32 pairs, contiguous [N1, N2, D] per batch row).

    FILTER: Z = F2 A, Z *= K[k1, k2, d] (1/M and the half spectrum's row weights folded in:
    spectrum_layout_kernel's HALF_ROWS), B = conj(F2) Z, B *= conj(W_M^(k1 n2)),
    written back over A. Otherwise (a plain DFT): out[b, k1 + N1 k2, d] = (F2 A)[k2, d], real part
    unless COMPLEX_OUT. NEED_IMAG = FILTER or COMPLEX_OUT. MIRROR: the D columns are a half
    spectrum of width MIRROR_W, and the real output's other half is stored too (_store_mirrored).

    The [P2, P2] DFT table (P2 <= plans.MAX_SPLIT_FACTOR = 128) never sits whole in registers, where
    it spilled (3 KB a thread at P2 = 128 in fp32 on sm_90, per `tritonlab compile-check`;
    ops.ROW_CHUNK has the numbers): Z = F2 A sums over CHUNK-row slices of A against CHUNK-column
    slices of F2, and with Y = Z * K the inverse is produced transposed, B^T = Y^T conj(F2) (F2 is
    symmetric), CHUNK columns at a time, each slice twiddled and stored as it is done.
    """
    pid_d = tl.program_id(0)
    k1 = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, P2)
    c = tl.arange(0, CHUNK)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < D
    # row k1 * N2 + n2 < M + P2 (M <= plans.MAX_SPLIT_M): int32 is safe before the widening
    a_row = pid_b * stride_ab  # this batch row's [N1, N2, D] block of A (real and imaginary planes)
    zr = tl.zeros((P2, BLOCK_D), dtype=tl.float32)
    zi = tl.zeros((P2, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, P2, CHUNK):
        j = j0 + c
        a_off = _offsets(k1 * N2 + j[:, None], D, dd[None, :], 1)
        amask = (j < N2)[:, None] & dmask[None, :]
        xr = tl.load(ar_ptr + a_row + a_off, mask=amask, other=0.0)
        xi = tl.load(ai_ptr + a_row + a_off, mask=amask, other=0.0)
        t_off = r[:, None] * P2 + j[None, :]  # F2[:, j]
        fr = tl.load(f2_ptr + t_off)
        fi = tl.load(f2_ptr + P2 * P2 + t_off)
        zr += _mm(fr, xr, PRECISION) - _mm(fi, xi, PRECISION)
        if NEED_IMAG:
            zi += _mm(fr, xi, PRECISION) + _mm(fi, xr, PRECISION)
    mask = (r < N2)[:, None] & dmask[None, :]
    if FILTER:
        k_off = pid_b * stride_kb + _offsets(k1 * N2 + r[:, None], D, dd[None, :], 1)
        kr = tl.load(kr_ptr + k_off, mask=mask, other=0.0)
        ki = tl.load(ki_ptr + k_off, mask=mask, other=0.0)
        ytr = tl.trans(zr * kr - zi * ki)  # [BLOCK_D, P2]
        yti = tl.trans(zr * ki + zi * kr)
        tl.debug_barrier()  # every warp has read its slices of A before any is overwritten
        for n0 in range(0, P2, CHUNK):
            n = n0 + c
            t_off = r[:, None] * P2 + n[None, :]  # F2[:, n] (= F2[n, :]^T)
            fr = tl.load(f2_ptr + t_off)
            fi = tl.load(f2_ptr + P2 * P2 + t_off)
            btr = _mm(ytr, fr, PRECISION) + _mm(yti, fi, PRECISION)  # B^T = Y^T conj(F2)
            bti = _mm(yti, fr, PRECISION) - _mm(ytr, fi, PRECISION)
            tphase = (k1.to(tl.int64) * n.to(tl.int64)) % M
            tr = tl.load(twc_ptr + tphase)[None, :]
            ti = tl.load(twc_ptr + M + tphase)[None, :]
            o_off = a_row + _offsets(k1 * N2 + n[None, :], D, dd[:, None], 1)
            omask = (n < N2)[None, :] & dmask[:, None]
            # times conj(W_M^(k1 n2)) = cos + i sin
            tl.store(ar_ptr + o_off, btr * tr - bti * ti, mask=omask)
            tl.store(ai_ptr + o_off, btr * ti + bti * tr, mask=omask)
    else:
        k = k1 + N1 * r
        y_off = pid_b * stride_yb + _offsets(k[:, None], stride_yn, dd[None, :], 1)
        tl.store(yr_ptr + y_off, zr.to(yr_ptr.dtype.element_ty), mask=mask)
        if COMPLEX_OUT:
            tl.store(yi_ptr + y_off, zi.to(yi_ptr.dtype.element_ty), mask=mask)
        if MIRROR:
            _store_mirrored(yr_ptr, pid_b * stride_yb, k[:, None], dd, M, MIRROR_W, stride_yn, 1,
                            zr.to(yr_ptr.dtype.element_ty), mask)
