"""@triton.jit kernels for the quantized family. Launchers (validation, config choice) are in ops.py.

Quantization (one rule everywhere, shared with fallback.py and reference.py):
    amax  = max |x| over the slice (NaN if the slice holds a NaN)
    scale = amax / qmax (correctly rounded float32), at least 2**-126 (the smallest normal float32:
            1 / scale stays finite), 1 where amax is 0
    v     = x * (1 / scale) in float32, NaN -> 0, clamped to [-qmax, qmax]
    q     = v rounded half to even onto the int8 / fp8 grid
The rounding is done in float32 arithmetic (the 1.5 * 2**23 magic number on v scaled by the grid
step), not by the hardware cast: the interpreter's fp32 -> fp8 cast is not round-to-nearest-even
and `libdevice.rint` does not run there, so this way the interpreter and the GPU give the same,
exact values. Divisions use `div_rn` because a plain `/` on the GPU is an approximate division.

- `quantize_rows_kernel`: BLOCK_M rows per program; one pass over x when BLOCK_N >= N (the row stays
  in registers), else two passes over the row (the second read mostly hits L2).
- `quantize_cols_kernel`: BLOCK_N columns per program, two passes down the columns.
- `tensor_amax_kernel` + `quantize_tensor_kernel`: whole-tensor scale without a host sync; the
  first kernel folds each block's amax into one int32 device word with atomic_max on the float's
  bit pattern (for non-negative floats the integer order is the float order, and a NaN's bits
  exceed inf's, so a NaN anywhere wins), the second reads it back.
- `scaled_mm_kernel`: C = act((A @ B^T) * a_scale * b_scale + bias) for int8 (int32 accumulation)
  and fp8 (float32 accumulation) operands, A [M, K], B [N, K] (nn.Linear layout, so B's tile is
  loaded K-major as the fp8 tensor cores want), grouped tile order for L2 reuse. With QUANT_OUT
  (only when one tile spans the whole row) the epilogue also quantizes each output row for the
  next layer and stores (q, row scale) instead of C.
"""
from __future__ import annotations

from .._triton import HAS_TRITON, jit, tl

if HAS_TRITON:
    from .._triton import apply_activation

# quantized kinds (constexpr codes)
KIND_INT8, KIND_E4M3, KIND_E5M2 = 0, 1, 2


@jit
def _round_to_grid(v, KIND: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr):
    """float32 v (already x / scale) -> float32 values on the target grid: NaN -> 0, saturate, RNE.
    For fp8, MANT is the mantissa width and EMIN the smallest normal exponent (3, -6 for e4m3)."""
    v = tl.where(v == v, v, 0.0)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if KIND == 0:
        # 1.5 * 2**23: (v + M) - M rounds to an integer, half to even, for |v| < 2**22. The clamp sits
        # between the scaling multiply and this add, so no FMA can fuse them.
        v = (v + 12582912.0) - 12582912.0
    else:
        # Grid step of v's binade: 2**(max(e, EMIN) - MANT); scale by powers of two (exact), round.
        bits = v.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        e = tl.maximum(e, EMIN) - MANT
        step = ((e + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((127 - e) << 23).to(tl.float32, bitcast=True)
        v = ((v * inv_step + 12582912.0) - 12582912.0) * step
        # (-tiny + M) - M is +0: put the sign bit back so a negative value that rounds to zero
        # becomes -0, as the fp8 cast (and ml_dtypes) gives (seen as 0x00 vs 0x80 on an H100).
        v = (v.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return v


@jit
def _scale_from_amax(amax, QMAX: tl.constexpr):
    """scale = amax / qmax, at least 2**-126 (MIN_SCALE), 1 where amax is 0 (all-zero slice);
    NaN/inf amax stay non-finite (a NaN compares false)."""
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    scale = tl.where(scale < 1.1754943508222875e-38, 1.1754943508222875e-38, scale)
    return tl.where(amax == 0.0, 1.0, scale)


@jit
def _nan_like(x):
    """A float32 NaN tensor of x's shape (built from its bits: no Python float in the kernel)."""
    return tl.full(x.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)


@jit
def _nan_aware_amax(x, axis: tl.constexpr):
    """max |x| along axis, NaN when the slice has a NaN (tl.max alone may drop NaNs on a GPU)."""
    amax = tl.max(tl.abs(x), axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis)
    return tl.where(has_nan > 0, _nan_like(amax), amax)


@jit
def quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_xm, stride_qm,
                         KIND: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * stride_xm
    q_rows = q_ptr + rows64[:, None] * stride_qm
    q_ty = q_ptr.dtype.element_ty
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        m = rmask[:, None] & (cols < N)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
        scale = _scale_from_amax(_nan_aware_amax(x, 1), QMAX)
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        q = _round_to_grid(x * inv[:, None], KIND, QMAX, MANT, EMIN)
        tl.store(q_rows + cols[None, :], q.to(q_ty), mask=m)
    else:
        run_max = tl.zeros([BLOCK_M], dtype=tl.float32)
        run_nan = tl.zeros([BLOCK_M], dtype=tl.int32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            m = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
            run_max = tl.maximum(run_max, tl.max(tl.abs(x), axis=1))
            run_nan = tl.maximum(run_nan, tl.max((x != x).to(tl.int32), axis=1))
        scale = _scale_from_amax(tl.where(run_nan > 0, _nan_like(run_max), run_max), QMAX)
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            m = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
            q = _round_to_grid(x * inv[:, None], KIND, QMAX, MANT, EMIN)
            tl.store(q_rows + cols[None, :], q.to(q_ty), mask=m)
    tl.store(s_ptr + rows, scale, mask=rmask)


@jit
def quantize_cols_kernel(x_ptr, q_ptr, s_ptr, M, N, stride_xm, stride_qm,
                         KIND: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    q_ty = q_ptr.dtype.element_ty
    run_max = tl.zeros([BLOCK_N], dtype=tl.float32)
    run_nan = tl.zeros([BLOCK_N], dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
        run_max = tl.maximum(run_max, tl.max(tl.abs(x), axis=0))
        run_nan = tl.maximum(run_nan, tl.max((x != x).to(tl.int32), axis=0))
    scale = _scale_from_amax(tl.where(run_nan > 0, _nan_like(run_max), run_max), QMAX)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        m = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=m, other=0.0).to(tl.float32)
        q = _round_to_grid(x * inv[None, :], KIND, QMAX, MANT, EMIN)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ty), mask=m)
    tl.store(s_ptr + cols, scale, mask=cmask)


@jit
def tensor_amax_kernel(x_ptr, amax_bits_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    amax = _nan_aware_amax(x, 0)
    # |x| >= 0, so its bit pattern orders like the float; a (positive) NaN's bits exceed inf's.
    bits = tl.where(amax != amax, 0x7FC00000, amax.to(tl.int32, bitcast=True))
    tl.atomic_max(amax_bits_ptr, bits)


@jit
def quantize_tensor_kernel(x_ptr, q_ptr, s_ptr, amax_bits_ptr, numel,
                           KIND: tl.constexpr, QMAX: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr,
                           BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    amax = tl.load(amax_bits_ptr + tl.arange(0, 1)).to(tl.float32, bitcast=True)
    scale = _scale_from_amax(amax, QMAX)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    if pid == 0:
        tl.store(s_ptr + tl.arange(0, 1), scale)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = _round_to_grid(x * inv, KIND, QMAX, MANT, EMIN)
    tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=m)


@jit
def _round_to_float_dtype(x, Y_TY: tl.constexpr):
    """float32 x rounded to Y_TY (bfloat16, float16 or float32), returned as float32. bfloat16 by
    integer arithmetic on the bits (round half to even; the interpreter's cast does not round to
    nearest), so the interpreter and a GPU agree with torch's rounding."""
    if Y_TY == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    elif Y_TY == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@jit
def scaled_mm_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, cs_ptr, M, N, K,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     IS_INT8: tl.constexpr, A_PER_ROW: tl.constexpr, B_PER_COL: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                     LOAD_BITS: tl.constexpr, INT_FILL: tl.constexpr, A_TY: tl.constexpr, B_TY: tl.constexpr,
                     Y_TY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                     QUANT_OUT: tl.constexpr = False, KIND: tl.constexpr = 0, QMAX: tl.constexpr = 127.0,
                     MANT: tl.constexpr = 0, EMIN: tl.constexpr = 0):
    """C = act((A @ B^T) * a_scale * b_scale + bias) rounded to Y_TY (out_dtype), or its row
    quantization with QUANT_OUT (module docstring)."""
    # Grouped ordering: GROUP_M row-tiles sweep the column tiles together, so B tiles stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    # Rows/cols past the edge wrap around (% M, % N): loads stay in bounds without masks and the
    # store mask drops the duplicates.
    offs_am = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_bn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    if IS_INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            if INT_FILL:  # integer zero: int8 values, or fp8 bit patterns (0 = +0.0)
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
            else:
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if LOAD_BITS:  # interpreter: fp8 tensors arrive as uint8 views (see ops._scaled_mm_triton)
            a = a.to(A_TY, bitcast=True)
            b = b.to(B_TY, bitcast=True)
        if IS_INT8:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue: scales, bias, activation in float32, one store in the output dtype.
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_cm < M
    nmask = offs_cn < N
    out = acc.to(tl.float32)
    if A_PER_ROW:
        out = out * tl.load(as_ptr + offs_cm, mask=mmask, other=0.0)[:, None]
    else:
        out = out * tl.load(as_ptr)
    if B_PER_COL:
        out = out * tl.load(bs_ptr + offs_cn, mask=nmask, other=0.0)[None, :]
    else:
        out = out * tl.load(bs_ptr)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_cn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # y rounded to out_dtype (round half to even, on a GPU as in the interpreter)
    out = _round_to_float_dtype(apply_activation(out, ACT), Y_TY)
    if QUANT_OUT:
        # The tile spans the whole row (BLOCK_N >= N, one column tile): quantize each row of y (as
        # rounded to out_dtype, as the unfused path stores it: q equals quantize(y) on every path, an
        # out_dtype overflow included) for the next layer here, with the quantize kernels' rule, and
        # store q and the row scale.
        out = tl.where(nmask[None, :], out, 0.0)
        row_scale = _scale_from_amax(_nan_aware_amax(out, 1), QMAX)
        inv = tl.math.div_rn(tl.full(row_scale.shape, 1.0, tl.float32), row_scale)
        out = _round_to_grid(out * inv[:, None], KIND, QMAX, MANT, EMIN)
        tl.store(cs_ptr + offs_cm, row_scale, mask=mmask)
    c_ptrs = c_ptr + offs_cm.to(tl.int64)[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
