"""Public FFT-mixing ops: validation, backend dispatch, Triton launchers, torch.library registration
with autograd, and the tunable-kernel registry entries.

Each op is a `torch.library.custom_op` (`tritonlab::fnet_mix`, `tritonlab::spectral_filter`,
`tritonlab::fft_conv`) with a fake implementation and a registered backward, so
`torch.compile(fullgraph=True)` keeps it in the graph and models train through it:
- fnet_mix is self-adjoint (Re(F_S X F_D) with symmetric cos and sin matrices): dx = fnet_mix(dy).
- spectral_filter is a circular convolution with c = irfft(filt): dx = spectral_filter(dy, conj(filt))
  (the same kernel); dfilt = w_k / S * sum_b DY conj(X) (fallback.spectral_filter_grad_filt).
- fft_conv: dx = flip(fft_conv(flip(dy), k)) (the correlation, the same kernel); dk = the
  cross-correlation of dy and x at lags < L (fallback.fft_conv_grad_k).
The parameter gradients run through torch.fft on every backend (a batch reduction; see the report).

Which Triton path each length takes is `plans.conv_plan` / `plans.dft_plan` (`describe_plan`).
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import torch

from .._accuracy import TF32_TOLERANCE, rel_error, tolerance
from .._backend import (FLOAT_DTYPES, SMALL_TILE, cdiv, check_backend, check_same_device, dispatch, empty_result,
                        new_output, resolve_backend)
from .._triton import interpreting
from .._tuning import TunableKernel, lookup_config, register
from . import fallback, plans, reference
from .plans import Plan
from .triton_kernels import (PREC_IEEE, PREC_TF32, PREC_TF32X3, dft_axis_kernel, dft_gemm_kernel,
                             fused_conv_kernel, spectrum_layout_kernel, split_rows_kernel, strided_copy_kernel)

#: x dtypes: the kernels' float32/float16/bfloat16, plus float64 on the torch backend (gradchecks)
REAL_DTYPES = FLOAT_DTYPES + (torch.float64,)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
#: "auto" runs the split (three-pass, out-of-register) Triton path for long sequences; set False to
#: send those lengths to the torch.fft fallback instead (a GPU measurement decides)
AUTO_USES_SPLIT = True
#: scratch of the split path (fp32 complex: the column spectrum, its first half for a convolution) is
#: allocated per batch chunk of at most this
SPLIT_SCRATCH_BYTES = 1 << 30
#: rows of A per step of the split row pass (split_rows_kernel): a [P2, 16] slice of the DFT table at a
#: time instead of the whole [P2, P2] table. On sm_90 (Triton 3.6, `tritonlab compile-check`, default
#: configs of the models shapes), registers / spilled bytes / shared KB, whole table -> slices:
#: fft_conv S=16384 (P2=128) bf16 255/96/144 -> 183/0/54, fp32 255/3136/64 -> 255/1048/65;
#: P2=64 (spectral_filter S=16384, fft_conv S=4096) bf16 118/0/48 -> 138/0/36, fp32 255/32/32 -> 240/0/50;
#: fnet_mix S=16384 bf16 64 -> 84, fp32 163 -> 84 registers. Slices of 32 need more registers.
ROW_CHUNK = 16
#: grid dims 1 and 2 of a CUDA launch are at most 65535: batches are launched in chunks
MAX_GRID_BATCH = 65535
#: grid dim 0 of a CUDA launch
MAX_GRID_X = 2**31 - 1
#: elements (bins x channels) per program of spectrum_layout_kernel
SPECTRUM_BLOCK = 2048
#: the [COPY_TILE, COPY_TILE] tiles of _copy_3d's transposing copy (8 KB of bf16 per tile)
COPY_TILE = 64
#: the kernels index within one tensor dim (a column, a channel, a position) in int32, a block past
#: its end included; every pointer offset itself is int64 (triton_kernels._offsets)
MAX_INT32_EXTENT = 2**31 - 2**16


# ----------------------------------------------------------------------------- validation

def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _check_real(name: str, t: object, layout: str) -> None:
    """TypeError naming `name` unless t is a real floating tensor (complex is named as such)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be a real floating tensor {layout}, got complex dtype {_dtype_name(t.dtype)}")
    if t.dtype not in REAL_DTYPES:
        raise TypeError(f"{name} must have dtype in ({', '.join(map(_dtype_name, REAL_DTYPES))}), got {_dtype_name(t.dtype)}")


def _check_x(x: object) -> torch.Tensor:
    _check_real("x", x, "[..., S, D]")
    if x.dim() < 2:
        raise ValueError(f"x must be [..., S, D] (at least 2 dims, mixing along dim -2), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"x has sequence length S = 0 (dim -2 of shape {tuple(x.shape)}); S must be >= 1")
    return x


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """[..., S, D] -> contiguous [B, S, D]."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _choose_backend(backend: str, x: torch.Tensor, plan_ok: bool, what: str) -> str:
    """'triton', 'triton-auto' (Triton picked by "auto": the op may still send a split-path length to
    torch, see AUTO_USES_SPLIT) or 'torch'. float64 and lengths without a Triton plan go to torch
    under "auto"; asking for "triton" explicitly then raises."""
    chosen = resolve_backend(backend, x.device)
    if chosen != "triton":
        return chosen
    if x.dtype == torch.float64:
        if backend == "triton":
            raise TypeError("x has dtype float64, which only backend='torch' computes; the Triton kernels "
                            "take float32/float16/bfloat16")
        return "torch"
    if not plan_ok:
        if backend == "triton":
            raise ValueError(f"{what}: no Triton plan for this length (the split path stops at a transform "
                             f"of {plans.MAX_SPLIT_M}); use backend='torch' or 'auto'")
        return "torch"
    return "triton" if backend == "triton" else "triton-auto"


def _use_triton(backend: str, plan: Optional[Plan]) -> bool:
    """Inside a custom op (eager, after tracing): run the Triton plan?"""
    if plan is None:  # only when the module limits were changed (plans.has_conv_plan assumes the defaults)
        if backend == "triton":
            raise ValueError("no Triton plan for this length under the current plans.MAX_* limits")
        return False
    if backend == "triton":
        return True
    return backend == "triton-auto" and (AUTO_USES_SPLIT or not plan.split)


def _precision(dtype: torch.dtype) -> int:
    """Dot precision: exact fp32 in the interpreter; tf32x3 (~fp32) for fp32 inputs and tf32 for
    bf16/fp16 inputs (whose rounding dominates) on a GPU."""
    if interpreting():
        return PREC_IEEE
    return PREC_TF32X3 if dtype == torch.float32 else PREC_TF32


def describe_plan(op: str, s: int, d: Optional[int] = None) -> str:
    """Which Triton path a length takes: op is "spectral_filter", "fft_conv_causal",
    "fft_conv_circular" or "fnet_mix" (then `d` is the width)."""
    names = ("spectral_filter", "fft_conv_causal", "fft_conv_circular", "fnet_mix")
    if op not in names:  # a wrong name ("fft_conv") would otherwise describe the circular plan
        raise ValueError(f"op must be one of {names}, got {op!r}")
    if op == "fnet_mix":
        if d is None:
            raise ValueError("d (the width D) is needed for op='fnet_mix'")
        if max(s, d) > plans.MAX_SPLIT_M:  # fnet_mix's rule
            return "torch.fft (no Triton plan)"
        out = []
        for axis, n in (("D", d), ("S", s)):
            p = plans.dft_plan(n)
            out.append(f"{axis}={n}: " + (p.describe() if p else "dense DFT GEMM (O(n^2))"))
        if d and _fnet_half_spectrum(s, d):
            out.append(f"half spectrum: {d // 2 + 1} of {d} columns along S, the rest by symmetry")
        return "; ".join(out)
    p = plans.conv_plan(s, op == "fft_conv_causal")
    return p.describe() if p else "torch.fft (no Triton plan)"


# ----------------------------------------------------------------------------- configs

def _conv_shape_plan(shape, causal: bool) -> Plan:
    return plans.conv_plan(int(shape["S"]), causal)


def _pow2_range(lo: int, hi: int):
    v = lo
    while v <= hi:
        yield v
        v *= 2


def _conv_default(shape, causal: bool) -> dict:
    plan = _conv_shape_plan(shape, causal)
    d = int(shape["D"])
    if plan is None:
        return {}
    if plan.split:
        return {"BLOCK_K": 32, "BLOCK_C": 64, "BLOCK_N": 32, "ROW_BLOCK_D": 16 if plan.P2 >= 128 else 32,
                "num_warps": 4}
    # about 2048 elements per tile: registers for a handful of fp32 complex tiles at 4-8 warps
    bd = plans.next_pow2(max(1, 2048 // (plan.P1 * plan.P2)))
    bd = max(plan.min_block, min(bd, plan.max_block, max(plan.min_block, plans.next_pow2(d))))
    tile = plan.P1 * plan.P2 * bd
    # small tiles: several batch rows per program share the DFT tables' loads
    return {"BLOCK_D": bd, "ROWS": 1 if tile >= 2048 else 2, "num_warps": 4 if tile <= 2048 else 8}


def _conv_space(shape, causal: bool) -> list[dict]:
    plan = _conv_shape_plan(shape, causal)
    if plan is None:
        return []
    out = []
    if plan.split:
        for bk, bc, bn, rd, nw in itertools.product((16, 32, 64), (32, 64, 128), (16, 32, 64), (16, 32, 64), (4, 8)):
            # shared memory of the column GEMMs (3 pipeline stages of complex operand tiles; a bound
            # that matches the sm_90 builds) and of the row pass must fit in 227 KB
            if bk * bc > 8192 or plan.P2 * rd > 8192 or 24 * (bn * bc + bk * bn) > 200 * 1024:
                continue
            out.append({"BLOCK_K": bk, "BLOCK_C": bc, "BLOCK_N": bn, "ROW_BLOCK_D": rd, "num_warps": nw})
        return out
    hi = min(plan.max_block, max(plan.min_block, plans.next_pow2(int(shape["D"]))))
    for bd in _pow2_range(plan.min_block, hi):
        tile = plan.P1 * plan.P2 * bd
        # several rows per program pipeline their loads: about twice the shared memory (sm_90 builds)
        for rows, nw in itertools.product((1, 2, 4, 8) if tile <= 2048 else (1,), (2, 4, 8)):
            if nw == 2 and tile > 2048:
                continue
            out.append({"BLOCK_D": bd, "ROWS": rows, "num_warps": nw})
            if bd <= 8 and rows == 1:  # under 32 bytes of channels per row: also try sequence-contiguous staging
                out.append({"BLOCK_D": bd, "ROWS": rows, "num_warps": nw, "SEQ_MAJOR": 1})
            # the row-DFT middle a slice of bins at a time (fused_conv_kernel's ROW_SLICE): whole
            # [P2, P2] tables spill at P2 = 64 on sm_90 (S = 4096 bf16 default: 255 registers + 56 B)
            for row_slice in (16, 32):
                if row_slice < plan.P2 and nw >= 4:
                    out.append({"BLOCK_D": bd, "ROWS": rows, "num_warps": nw, "ROW_SLICE": row_slice})
    return out


def _fnet_default(shape) -> dict:
    s, d = int(shape["S"]), int(shape["D"])
    cfg = {"BLOCK_K": 32, "BLOCK_C": 64, "BLOCK_N": 32, "ROW_BLOCK_D": 32, "num_warps": 4}
    for key, n in (("D_BLOCK", d), ("S_BLOCK", s)):
        p = plans.dft_plan(n)
        if p is not None and not p.split:
            bd = plans.next_pow2(max(1, 2048 // (p.P1 * p.P2)))
            cfg[key] = max(p.min_block, min(bd, p.max_block))
        else:
            cfg[key] = 16
    return cfg


def _fnet_space(shape) -> list[dict]:
    s, d = int(shape["S"]), int(shape["D"])
    ranges = []
    for n in (d, s):
        p = plans.dft_plan(n)
        ranges.append(list(_pow2_range(p.min_block, p.max_block)) if p is not None and not p.split else [16])
    out = []
    for db, sb, nw in itertools.product(ranges[0], ranges[1], (4, 8)):
        base = dict(_fnet_default(shape))
        base.update({"D_BLOCK": db, "S_BLOCK": sb, "num_warps": nw})
        out.append(base)
    return out


# ----------------------------------------------------------------------------- Triton launchers

def _grid(*dims: int) -> tuple[int, ...]:
    """A launch grid checked against CUDA's limits: a ValueError naming the dim, not a failed launch."""
    for axis, n in enumerate(dims):
        limit = MAX_GRID_X if axis == 0 else MAX_GRID_BATCH
        if not 1 <= n <= limit:
            raise ValueError(f"launch grid {dims}: dim {axis} = {n} is outside CUDA's 1..{limit}; "
                             "use backend='torch' for this shape")
    return tuple(dims)


def _rows(t: torch.Tensor, b0: int, b1: int) -> torch.Tensor:
    """Batch rows b0..b1 of t for one launch of a chunked batch: t itself when that is all of it
    (the common case, one launch: no slice op on the host path)."""
    return t if b0 == 0 and b1 == t.shape[0] else t[b0:b1]


def _tail(flat: torch.Tensor, offset: int) -> torch.Tensor:
    """flat[offset:] of a flat buffer, without a slice op when the offset is 0 (the one-launch case)."""
    return flat if offset == 0 else flat[offset:]


def _check_extents(**extents: int) -> None:
    """ValueError naming the dim when one is too long for the kernels' int32 in-dim indices."""
    for name, n in extents.items():
        if n > MAX_INT32_EXTENT:
            raise ValueError(f"{name} = {n} is too long for the Triton kernels' int32 indices "
                             f"(at most {MAX_INT32_EXTENT}); use backend='torch'")


def _conv_spectrum(plan: Plan, s: int, d: int, filt: Optional[torch.Tensor] = None,
                   k: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel spectrum (1/M folded in) in the plan's layout, as float32 (real, imaginary).

    From a half-spectrum filter [Bf, S//2+1, D]: exactly the Hermitian spectrum irfft implies (DC and
    Nyquist imaginary parts dropped) when M = S; for the periodic extension, the M-point spectrum
    of the circular kernel irfft(filt). From a kernel k [L, D]: its zero-padded M-point spectrum.
    Either way a half spectrum [Bh, M//2+1, D] goes through spectrum_layout_kernel, which extends,
    scales and lays it out in one launch.
    """
    m = plan.M
    if filt is not None:
        if plan.mode == plans.CIRC:
            half_spec = filt.to(torch.complex64).resolve_conj()  # a lazy conj() view: view_as_real needs it resolved
        else:
            circ = torch.fft.irfft(fallback.hermitian_filter(filt, s, torch.float32), n=s, dim=1)
            half_spec = torch.fft.rfft(circ, n=m, dim=1)
    else:
        half_spec = torch.fft.rfft(k.to(torch.float32), n=m, dim=0)[None]
    h = torch.view_as_real(half_spec.contiguous())
    bh = h.shape[0]
    if plan.split:  # [Bh, N1 // 2 + 1, N2, D]: the split path keeps the column spectrum's first half
        rows, k2_stored = plan.split_rows, plan.N2
        kr = new_output((bh, rows, plan.N2, d), torch.float32, h.device)
        strides = (plan.N2 * d, d, 1)
    else:  # [Bh, P1, D, P2], zero past N1 and N2
        rows, k2_stored = plan.P1, plan.P2
        kr = new_output((bh, plan.P1, d, plan.P2), torch.float32, h.device)
        strides = (d * plan.P2, 1, plan.P2)
    ki = new_output(kr.shape, torch.float32, h.device)  # poisoned in tests: every element is written
    block_d = SPECTRUM_BLOCK // plan.P2
    for b0 in range(0, bh, MAX_GRID_BATCH):
        b1 = min(bh, b0 + MAX_GRID_BATCH)
        spectrum_layout_kernel[_grid(cdiv(d, block_d), rows, b1 - b0)](
            _rows(h, b0, b1), _rows(kr, b0, b1), _rows(ki, b0, b1), m, plan.N1, plan.N2, k2_stored, d,
            h.stride(0), kr.stride(0), *strides, 1.0 / m, P2=plan.P2, BLOCK_D=block_d, HALF_ROWS=plan.split,
            num_warps=4)
    return kr, ki


def _dummy_table(device) -> torch.Tensor:
    return plans.dft_matrix(1, 16, plans.device_key(device))


def _launch_fused_conv(x, y, kr, ki, plan: Plan, cfg: dict) -> None:
    b, s, d = x.shape
    dev = plans.device_key(x.device)
    f1 = plans.dft_matrix(plan.N1, plan.P1, dev)
    f2 = plans.dft_matrix(plan.N2, plan.P2, dev) if not plan.dense else f1
    tw = plans.twiddles(plan.N1, plan.N2, plan.P1, plan.P2, dev) if not plan.dense else f1
    skb = 0 if kr.shape[0] == 1 else kr.stride(0)
    rows = cfg.get("ROWS", 1)
    step = MAX_GRID_BATCH * rows
    # SEQ_MAJOR (a tunable): with few channels per program, channels-fastest loads use a few bytes
    # of each 32-byte sector; staging x and y channel-major ([B, D, S] copies) makes the sequence
    # axis contiguous instead, at the price of two transposing passes
    seq_major = bool(cfg.get("SEQ_MAJOR", 0))
    xk, yk = x, y
    if seq_major:
        xk = torch.empty((b, d, s), dtype=x.dtype, device=x.device).transpose(1, 2)
        yk = torch.empty((b, d, s), dtype=y.dtype, device=y.device).transpose(1, 2)
        _copy_3d(x, xk)
    row_slice = int(cfg.get("ROW_SLICE", 0)) if plan.P2 > 1 else 0
    if row_slice and not (row_slice >= 16 and row_slice & (row_slice - 1) == 0 and plan.P2 % row_slice == 0):
        raise ValueError(f"ROW_SLICE={row_slice} must be a power of two >= 16 dividing the row tile P2={plan.P2}")
    for b0 in range(0, b, step):
        b1 = min(b, b0 + step)
        kb = (kr, ki) if skb == 0 else (_rows(kr, b0, b1), _rows(ki, b0, b1))
        xs, ys = _rows(xk, b0, b1), _rows(yk, b0, b1)
        fused_conv_kernel[_grid(cdiv(d, cfg["BLOCK_D"]), cdiv(b1 - b0, rows))](
            xs, ys, kb[0], kb[1], f1, f2, tw, b1 - b0, s, d, *xs.stride(), *ys.stride(),
            skb, N1=plan.N1, N2=plan.N2, P1=plan.P1, P2=plan.P2, MODE=plan.mode, BLOCK_D=cfg["BLOCK_D"],
            ROWS=rows, PRECISION=_precision(x.dtype), ROW_SLICE=row_slice, HALF_IO=plan.half_io,
            num_warps=cfg["num_warps"])
    if seq_major:
        _copy_3d(yk, y)


def _copy_3d(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[...] = src for two [B, R, C] views of one shape and dtype, any strides: a tiled transpose
    when one is contiguous along C and the other along R (torch's strided copy_ reached about a fifth
    of the H100's bandwidth on SEQ_MAJOR's [64, 1024, 768] bf16 staging, 2 x 354 us). Column tiles on
    grid dim 0 (up to 2**31 - 1), row tiles on dim 1 (S <= plans' 2**18 / 64 tiles)."""
    b, r, c = src.shape
    for b0 in range(0, b, MAX_GRID_BATCH):
        b1 = min(b, b0 + MAX_GRID_BATCH)
        sv, dv = _rows(src, b0, b1), _rows(dst, b0, b1)
        strided_copy_kernel[_grid(cdiv(c, COPY_TILE), cdiv(r, COPY_TILE), b1 - b0)](
            sv, dv, r, c, *sv.stride(), *dv.stride(), BLOCK_R=COPY_TILE, BLOCK_C=COPY_TILE, num_warps=4)


def _row_chunk(plan: Plan) -> int:
    """Rows of A (and columns of the DFT table) per step of split_rows_kernel's loops."""
    return min(plan.P2, ROW_CHUNK)


def _split_batch(b: int, per_row_bytes: int) -> int:
    return max(1, min(b, MAX_GRID_BATCH, SPLIT_SCRATCH_BYTES // max(per_row_bytes, 1)))


def _launch_split_conv(x, y, kr, ki, plan: Plan, cfg: dict) -> None:
    """Three passes through an fp32 complex scratch: column DFTs (+ twiddles), the fused row pass
    (row DFT, multiply, inverse row DFT, conjugate twiddles), inverse column DFTs (real part).

    x and y are real and the kernel spectrum Hermitian, so the column spectrum's rows k1 and N1 - k1
    are conjugates at every stage (the forward column DFT is of real data, the inverse one gives
    real data): the passes keep rows k1 <= N1 / 2 only (plan.split_rows), and the real part of
    the last one over those rows is the whole inverse once rows 0 < k1 < N1 / 2 count twice (the
    spectrum carries the factor: spectrum_layout_kernel's HALF_ROWS). That halves the scratch and
    the row pass, and cuts the column GEMMs' rows (by a quarter at 32-row tiles: N1 / 2 + 1 rows)."""
    b, s, d = x.shape
    n1, n2, m = plan.N1, plan.N2, plan.M
    dev = plans.device_key(x.device)
    (tab1, dense1), circm = plans.gemm_table(n1, dev), plans.unit_circle(m, dev)
    f2 = plans.dft_matrix(n2, plan.P2, dev)
    prec = _precision(x.dtype)
    cols = n2 * d
    half = plan.split_rows
    _check_extents(split_columns=cols)
    chunk = _split_batch(b, 8 * half * cols)
    ar = new_output((chunk, half, cols), torch.float32, x.device)
    ai = new_output((chunk, half, cols), torch.float32, x.device)
    skb = 0 if kr.shape[0] == 1 else kr.stride(0)
    bk, bc, bn, nw = cfg["BLOCK_K"], cfg["BLOCK_C"], cfg["BLOCK_N"], cfg["num_warps"]
    # causal: output rows n1 >= cdiv(S, N2) hold no position < S, so no program computes them
    out_rows = min(n1, cdiv(s, n2)) if plan.mode == plans.CAUSAL else n1
    for b0 in range(0, b, chunk):
        b1 = min(b, b0 + chunk)
        nb = b1 - b0
        xs, ys = _rows(x, b0, b1), _rows(y, b0, b1)
        kb = (kr, ki) if skb == 0 else (_rows(kr, b0, b1), _rows(ki, b0, b1))
        dft_gemm_kernel[_grid(cdiv(cols, bc), cdiv(half, bk), nb)](
            xs, xs, ar, ai, tab1, circm, n1, cols, s, n2, d, m, half, n1,
            xs.stride(0), 0, 1, ar.stride(0), ar.stride(1), 1,
            SIGN=-1, COMPLEX_IN=False, COMPLEX_OUT=True, IN_MODE=plan.mode, OUT_MODE=-1, TWIDDLE=True, NEED_IMAG=True,
            BLOCK_K=bk, BLOCK_C=bc, BLOCK_N=bn, PRECISION=prec, DENSE_TABLE=dense1, num_warps=nw)
        split_rows_kernel[_grid(cdiv(d, cfg["ROW_BLOCK_D"]), half, nb)](
            ar, ai, kb[0], kb[1], f2, circm, ar, ai, n1, n2, d, m, ar.stride(0), skb, 0, 0, 0,
            P2=plan.P2, CHUNK=_row_chunk(plan), FILTER=True, COMPLEX_OUT=False, NEED_IMAG=True, BLOCK_D=cfg["ROW_BLOCK_D"],
            PRECISION=prec, num_warps=nw)
        dft_gemm_kernel[_grid(cdiv(cols, bc), cdiv(out_rows, bk), nb)](
            ar, ai, ys, ys, tab1, tab1, n1, cols, s, n2, d, m, out_rows, half,
            ar.stride(0), ar.stride(1), 1, ys.stride(0), 0, 1,
            SIGN=1, COMPLEX_IN=True, COMPLEX_OUT=False, IN_MODE=-1, OUT_MODE=plan.mode, TWIDDLE=False, NEED_IMAG=False,
            BLOCK_K=bk, BLOCK_C=bc, BLOCK_N=bn, PRECISION=prec, DENSE_TABLE=dense1, num_warps=nw)


def _conv_triton(x: torch.Tensor, plan: Plan, cfg: dict, filt=None, k=None) -> torch.Tensor:
    b, s, d = x.shape
    y = new_output((b, s, d), x.dtype, x.device)
    kr, ki = _conv_spectrum(plan, s, d, filt=filt, k=k)
    if plan.split:
        _launch_split_conv(x, y, kr, ki, plan, cfg)
    else:
        _launch_fused_conv(x, y, kr, ki, plan, cfg)
    return y


def _dft_axis(xr, xi, yr, yi, length: int, cols: int, batch: int, x_strides, y_strides,
              complex_in: bool, complex_out: bool, block: int, cfg: dict, prec: int,
              allow_split: bool = True, bins: Optional[int] = None, mirror_width: int = 0) -> None:
    """One forward DFT of `length` along an axis: out[b, k, c] = sum_n W^(k n) in[b, n, c].

    x_strides / y_strides are (batch, n, c) strides in elements. Picks the in-register, split or dense
    GEMM path by plans.dft_plan; the split path needs a sequence axis of [B, S, C] with contiguous
    channels (allow_split=False for the transform along D, which then takes the dense GEMM).
    bins (in-register plans): only the bins k < bins are stored (default all). mirror_width W > 0 (a
    real output; not the dense GEMM path): the columns are the half spectrum of real data of width W,
    and the rest of the real output is stored by symmetry (dft_axis_kernel's MIRROR).
    """
    _check_extents(length=length, columns=cols)
    plan = plans.dft_plan(length)
    if plan is not None and plan.split and not allow_split:
        plan = None
    if bins is not None and (plan is None or plan.split):
        raise ValueError(f"bins needs an in-register plan (length {length} has none)")
    if mirror_width and (plan is None or complex_out):
        raise ValueError(f"mirror_width needs an in-register or split plan (length {length}) and a real output")
    dev = plans.device_key(xr.device)
    nw = cfg["num_warps"]
    if plan is not None and not plan.split:
        f1 = plans.dft_matrix(plan.N1, plan.P1, dev)
        f2 = plans.dft_matrix(plan.N2, plan.P2, dev) if not plan.dense else f1
        tw = plans.twiddles(plan.N1, plan.N2, plan.P1, plan.P2, dev) if not plan.dense else f1
        block = max(plan.min_block, min(block, plan.max_block))
        if plan.P1 * plan.P2 * block < SMALL_TILE:
            nw = min(nw, 4)
        for b0 in range(0, batch, MAX_GRID_BATCH):
            nb = min(batch, b0 + MAX_GRID_BATCH) - b0
            xo, yo = b0 * x_strides[0], b0 * y_strides[0]
            dft_axis_kernel[_grid(cdiv(cols, block), nb)](
                _tail(xr, xo), _tail(xi, xo), _tail(yr, yo), _tail(yi, yo),
                f1, f2, tw, cols, length if bins is None else bins, mirror_width, *x_strides, *y_strides,
                N1=plan.N1, N2=plan.N2, P1=plan.P1, P2=plan.P2, COMPLEX_IN=complex_in, COMPLEX_OUT=complex_out,
                MIRROR=mirror_width > 0, BLOCK_C=block, PRECISION=prec, num_warps=nw)
        return
    bk, bc, bn = cfg["BLOCK_K"], cfg["BLOCK_C"], cfg["BLOCK_N"]
    if plan is None:  # dense DFT as a GEMM over the whole axis
        tab, dense = plans.gemm_table(length, dev)
        for b0 in range(0, batch, MAX_GRID_BATCH):
            nb = min(batch, b0 + MAX_GRID_BATCH) - b0
            xo, yo = b0 * x_strides[0], b0 * y_strides[0]
            dft_gemm_kernel[_grid(cdiv(cols, bc), cdiv(length, bk), nb)](
                _tail(xr, xo), _tail(xi, xo), _tail(yr, yo), _tail(yi, yo),
                tab, tab, length, cols, 1, 1, 1, 1, length, length, *x_strides, *y_strides,
                SIGN=-1, COMPLEX_IN=complex_in, COMPLEX_OUT=complex_out, IN_MODE=-1, OUT_MODE=-1, TWIDDLE=False,
                NEED_IMAG=complex_out, BLOCK_K=bk, BLOCK_C=bc, BLOCK_N=bn, PRECISION=prec, DENSE_TABLE=dense,
                num_warps=nw)
        return
    # split: only for a sequence axis of a [B, S, C] tensor with contiguous channels (n stride = C)
    n1, n2, m = plan.N1, plan.N2, plan.M
    assert x_strides[2] == 1 and y_strides[2] == 1 and x_strides[1] == cols
    (tab1, dense1), circm = plans.gemm_table(n1, dev), plans.unit_circle(m, dev)
    f2 = plans.dft_matrix(n2, plan.P2, dev)
    width = n2 * cols
    _check_extents(split_columns=width)
    chunk = _split_batch(batch, 8 * n1 * width)
    ar = new_output((chunk, n1, width), torch.float32, xr.device)
    ai = new_output((chunk, n1, width), torch.float32, xr.device)
    rd = cfg["ROW_BLOCK_D"]
    for b0 in range(0, batch, chunk):
        nb = min(batch, b0 + chunk) - b0
        xo, yo = b0 * x_strides[0], b0 * y_strides[0]
        dft_gemm_kernel[_grid(cdiv(width, bc), cdiv(n1, bk), nb)](
            _tail(xr, xo), _tail(xi, xo), ar, ai, tab1, circm, n1, width, 1, n2, cols, m, n1, n1,
            x_strides[0], width, 1, ar.stride(0), ar.stride(1), 1,
            SIGN=-1, COMPLEX_IN=complex_in, COMPLEX_OUT=True, IN_MODE=-1, OUT_MODE=-1, TWIDDLE=True, NEED_IMAG=True,
            BLOCK_K=bk, BLOCK_C=bc, BLOCK_N=bn, PRECISION=prec, DENSE_TABLE=dense1, num_warps=nw)
        split_rows_kernel[_grid(cdiv(cols, rd), n1, nb)](
            ar, ai, ar, ai, f2, circm, _tail(yr, yo), _tail(yi, yo), n1, n2, cols, m, ar.stride(0), 0, y_strides[0],
            y_strides[1], mirror_width, P2=plan.P2, CHUNK=_row_chunk(plan), FILTER=False, COMPLEX_OUT=complex_out,
            NEED_IMAG=complex_out, BLOCK_D=rd, PRECISION=prec, MIRROR=mirror_width > 0, num_warps=nw)


def _fnet_half_spectrum(s: int, d: int) -> bool:
    """Whether fnet_mix keeps only the D // 2 + 1 columns of the half spectrum between its passes: the
    D pass needs an in-register plan (its bin mask), the S pass any but the dense GEMM (mirrored stores)."""
    plan_d, plan_s = plans.dft_plan(d), plans.dft_plan(s)
    return d // 2 + 1 < d and plan_d is not None and not plan_d.split and plan_s is not None


def _fnet_triton(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    b, s, d = x.shape
    prec = _precision(x.dtype)
    xf = x.reshape(-1)
    half = _fnet_half_spectrum(s, d)
    w = d // 2 + 1 if half else d  # spectrum columns kept between the passes
    wr = new_output((b * s * w,), torch.float32, x.device)
    wi = new_output((b * s * w,), torch.float32, x.device)
    # along D: rows are the B*S tokens (columns of this transform), one batch
    _dft_axis(xf, xf, wr, wi, d, b * s, 1, (0, 1, d), (0, 1, w), False, True, cfg["D_BLOCK"], cfg, prec,
              allow_split=False, bins=w if half else None)
    y = new_output((b, s, d), x.dtype, x.device)
    yf = y.reshape(-1)
    # along S: complex input, only the real part is stored (from a half spectrum, the rest by symmetry)
    _dft_axis(wr, wi, yf, yf, s, w, b, (s * w, w, 1), (s * d, d, 1), True, False, cfg["S_BLOCK"], cfg, prec,
              mirror_width=d if half else 0)
    return y


def _config(name: str, shape: dict, x: torch.Tensor) -> dict:
    return lookup_config(name, shape, x.dtype, x.device)


# ----------------------------------------------------------------------------- custom ops

def _fnet_mix_impl(x: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton" or (backend == "triton-auto"
                               and (AUTO_USES_SPLIT or not getattr(plans.dft_plan(x.shape[1]), "split", False))):
        b, s, d = x.shape
        return _fnet_triton(x, _config("fnet_mix", {"B": b, "S": s, "D": d}, x))
    return fallback.fnet_mix_torch(x)


# The custom ops return contiguous outputs, the layout their fakes promise (inductor checks the real
# strides against them). The torch path may return a transposed view (torch.fft.irfft along S does):
# eager calls, which go straight to the _impl functions, keep it and skip the copy (at B=8, S=1024,
# D=768 on the CPU it would cost spectral_filter more than its own FFTs).

def _fnet_mix_op_impl(x: torch.Tensor, backend: str) -> torch.Tensor:
    return _fnet_mix_impl(x, backend).contiguous()


_fnet_mix_op = torch.library.custom_op("tritonlab::fnet_mix", _fnet_mix_op_impl, mutates_args=())


@_fnet_mix_op.register_fake
def _(x, backend):
    return torch.empty_like(x)


def _fnet_setup(ctx, inputs, output):
    ctx.backend = inputs[1]


def _fnet_backward(ctx, grad):
    return _fnet_mix_op(grad.contiguous(), ctx.backend), None


torch.library.register_autograd("tritonlab::fnet_mix", _fnet_backward, setup_context=_fnet_setup)


def _spectral_filter_impl(x: torch.Tensor, filt: torch.Tensor, backend: str) -> torch.Tensor:
    b, s, d = x.shape
    plan = plans.conv_plan(s, False) if backend != "torch" else None
    if _use_triton(backend, plan):
        cfg = _config("spectral_filter", {"B": b, "S": s, "D": d}, x)
        return _conv_triton(x, plan, cfg, filt=filt)
    return fallback.spectral_filter_torch(x, filt)


def _spectral_filter_op_impl(x: torch.Tensor, filt: torch.Tensor, backend: str) -> torch.Tensor:
    return _spectral_filter_impl(x, filt, backend).contiguous()


_spectral_filter_op = torch.library.custom_op("tritonlab::spectral_filter", _spectral_filter_op_impl,
                                              mutates_args=())


@_spectral_filter_op.register_fake
def _(x, filt, backend):
    return torch.empty_like(x)


def _filter_setup(ctx, inputs, output):
    x, filt, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, filt)


def _filter_backward(ctx, grad):
    x, filt = ctx.saved_tensors
    grad = grad.contiguous()
    gx = gf = None
    if ctx.needs_input_grad[0]:  # the adjoint of a circular filter is the conjugate filter
        gx = _spectral_filter_op(grad, torch.conj_physical(filt), ctx.backend)
    if ctx.needs_input_grad[1]:
        gf = fallback.spectral_filter_grad_filt(x, grad, filt)
    return gx, gf, None


torch.library.register_autograd("tritonlab::spectral_filter", _filter_backward, setup_context=_filter_setup)


def _fft_conv_impl(x: torch.Tensor, k: torch.Tensor, causal: bool, backend: str) -> torch.Tensor:
    b, s, d = x.shape
    plan = plans.conv_plan(s, causal) if backend != "torch" else None
    if _use_triton(backend, plan):
        cfg = _config("fft_conv" if causal else "spectral_filter", {"B": b, "S": s, "D": d}, x)
        return _conv_triton(x, plan, cfg, k=k)
    return fallback.fft_conv_torch(x, k, causal)


def _fft_conv_op_impl(x: torch.Tensor, k: torch.Tensor, causal: bool, backend: str) -> torch.Tensor:
    return _fft_conv_impl(x, k, causal, backend).contiguous()


_fft_conv_op = torch.library.custom_op("tritonlab::fft_conv", _fft_conv_op_impl, mutates_args=())


@_fft_conv_op.register_fake
def _(x, k, causal, backend):
    return torch.empty_like(x)


def _conv_setup(ctx, inputs, output):
    x, k, causal, backend = inputs
    ctx.causal, ctx.backend = causal, backend
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, k)


def _conv_backward(ctx, grad):
    x, k = ctx.saved_tensors
    gx = gk = None
    if ctx.needs_input_grad[0]:  # correlation = flip o convolution o flip, the same kernel
        gx = _fft_conv_op(grad.flip(1).contiguous(), k, ctx.causal, ctx.backend).flip(1)
    if ctx.needs_input_grad[1]:
        gk = fallback.fft_conv_grad_k(x, grad.contiguous(), k, ctx.causal)
    return gx, gk, None, None


torch.library.register_autograd("tritonlab::fft_conv", _conv_backward, setup_context=_conv_setup)


# ----------------------------------------------------------------------------- public API

def fnet_mix(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """FNet token mixing: Re(FFT_S(FFT_D(x))), the real part of the 2-D DFT over the last two dims.

    Args:
        x: [..., S, D] float32/float16/bfloat16 (float64 on backend="torch"), any S >= 1 and D
            (D = 0 or an empty batch gives an empty result; backend="triton" up to plans.MAX_SPLIT_M,
            "auto" runs torch.fft past it).
        backend: "auto" | "triton" | "torch" (see DESIGN.md).
    Returns:
        [..., S, D] in x's dtype, float32 math. Unnormalized, as numpy.fft (and FNet). Differentiable
        (the op is self-adjoint).
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    _check_x(x)
    if x.numel() == 0:
        return empty_result(x.shape, x, x)
    # past the split path's largest transform a length has only the O(n^2) dense DFT GEMM (whose grid
    # also overflows CUDA's dim-1 limit past ~2M): "auto" sends it to torch.fft, as the convolutions do
    plan_ok = max(x.shape[-2], x.shape[-1]) <= plans.MAX_SPLIT_M
    chosen = _choose_backend(backend, x, plan_ok, "fnet_mix")
    return dispatch(_fnet_mix_op, _fnet_mix_impl, _as_batch(x), chosen, needs_autograd=True).reshape(x.shape)


def spectral_filter(x: torch.Tensor, filt: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Global spectral filter along the sequence: irfft(rfft(x, dim=S) * filt, n=S, dim=S).

    Args:
        x: [..., S, D] float32/float16/bfloat16 (float64 on backend="torch"), S >= 1.
        filt: complex64/complex128 half spectrum [S//2 + 1, D] shared by the batch, or
            [..., S//2 + 1, D] with x's leading dims (an input-dependent filter, e.g. adaptive).
            As numpy's irfft, the imaginary parts at DC (and Nyquist, even S) are ignored.
        backend: "auto" | "triton" | "torch".
    Returns:
        [..., S, D] in x's dtype (float32 math). Exact circular semantics for every S (no padding
        of the signal). Differentiable in x and filt.
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    _check_x(x)
    if not isinstance(filt, torch.Tensor):
        raise TypeError(f"filt must be a torch.Tensor, got {type(filt).__name__}")
    if not filt.is_complex():
        raise TypeError(f"filt must be a complex tensor (complex64/complex128 half spectrum), got real dtype "
                        f"{_dtype_name(filt.dtype)}; use torch.complex(re, im) or torch.view_as_complex")
    if filt.dtype not in COMPLEX_DTYPES:
        raise TypeError(f"filt must have dtype complex64 or complex128, got {_dtype_name(filt.dtype)}")
    s, d = x.shape[-2], x.shape[-1]
    lead = tuple(x.shape[:-2])
    shared, batched = (s // 2 + 1, d), lead + (s // 2 + 1, d)
    fshape = tuple(filt.shape)
    # two != tests, not `not in`: under torch.compile(dynamic=True) dynamo answered `in` over tuples
    # of SymInts wrongly for a parameter's static shape (a spurious error under fullgraph=True)
    if fshape != shared and fshape != batched:
        raise ValueError(f"filt must have shape [S//2 + 1, D] = {list(shared)} (or {list(batched)} per input) "
                         f"for x of shape {tuple(x.shape)}, got {tuple(filt.shape)}")
    check_same_device(x=x, filt=filt)
    if x.numel() == 0:
        return empty_result(x.shape, x, x, filt)
    f3 = filt.reshape(-1, s // 2 + 1, d).contiguous()
    chosen = _choose_backend(backend, x, plans.has_conv_plan(s, False), "spectral_filter")
    return dispatch(_spectral_filter_op, _spectral_filter_impl, _as_batch(x), f3, chosen,
                    needs_autograd=True).reshape(x.shape)


def fft_conv(x: torch.Tensor, k: torch.Tensor, causal: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """Long convolution along the sequence with a per-channel kernel (Hyena / FlashFFTConv style).

    Args:
        x: [..., S, D] float32/float16/bfloat16 (float64 on backend="torch"), S >= 1.
        k: real [L, D] kernel, 1 <= L <= S (any float dtype; used in float32). Shorter kernels are
            zero-padded.
        causal: True: y[s] = sum_{j <= s} k[j] x[s - j] (linear convolution truncated to S, no
            wrap-around); False: circular, y[s] = sum_j k[j] x[(s - j) mod S].
        backend: "auto" | "triton" | "torch".
    Returns:
        [..., S, D] in x's dtype (float32 math). Differentiable in x and k.
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    _check_x(x)
    _check_real("k", k, "[L, D]")
    s, d = x.shape[-2], x.shape[-1]
    if k.dim() != 2 or k.shape[1] != d:
        raise ValueError(f"k must be [L, D] with D = {d} (x's last dim), got shape {tuple(k.shape)}")
    if k.shape[0] > s:
        raise ValueError(f"k has length L = {k.shape[0]}, longer than the sequence (S = {s}); the kernel "
                         "must have 1 <= L <= S")
    if k.shape[0] == 0:
        raise ValueError("k has length L = 0; the kernel needs at least one tap")
    if isinstance(causal, np.bool_):  # numpy's bool (a mask element, say) means the same
        causal = bool(causal)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_same_device(x=x, k=k)
    if x.numel() == 0:
        return empty_result(x.shape, x, x, k)
    chosen = _choose_backend(backend, x, plans.has_conv_plan(s, causal), "fft_conv")
    return dispatch(_fft_conv_op, _fft_conv_impl, _as_batch(x), k.contiguous(), causal, chosen,
                    needs_autograd=True).reshape(x.shape)


# ----------------------------------------------------------------------------- tuning registry

def _inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, s, d = int(shape["B"]), int(shape["S"]), int(shape["D"])
    x = torch.randn(b, s, d, generator=g).to(device=device, dtype=dtype)
    filt = torch.complex(torch.randn(s // 2 + 1, d, generator=g), torch.randn(s // 2 + 1, d, generator=g))
    k = torch.randn(s, d, generator=g) * s**-0.5
    return {"x": x, "filt": filt.to(device), "k": k.to(device=device, dtype=dtype)}


def _check_rows(out: torch.Tensor, ref_fn, rows: int = 2) -> float:
    """Error on the first and last batch rows (rows are independent; keeps the reference cheap)."""
    idx = sorted({0, out.shape[0] - 1})[:rows]
    return rel_error(out[idx], ref_fn(idx))


def _tune_tolerance(dtype: torch.dtype) -> float:
    return TF32_TOLERANCE if dtype == torch.float32 else tolerance(dtype)


def _tune_presets():
    return {"small": [{"B": 2, "S": s, "D": 24} for s in (48, 100)],
            "models": [{"B": 64, "S": s, "D": 768} for s in (1024, 2048, 4096, 16384)],
            "full": [{"B": b, "S": s, "D": d} for b in (8, 64) for s in (256, 1000, 1024, 2048, 4096, 8192, 16384)
                     for d in (512, 768, 1024)]}


register(TunableKernel(
    name="spectral_filter",
    default=lambda shape: _conv_default(shape, False), space=lambda shape: _conv_space(shape, False),
    make_inputs=_inputs,
    run=lambda inp, cfg: _conv_triton(inp["x"], plans.conv_plan(inp["x"].shape[1], False), cfg, filt=inp["filt"][None]),
    error=lambda inp, out: _check_rows(out, lambda i: reference.spectral_filter_ref(inp["x"][i], inp["filt"])),
    tolerance=_tune_tolerance, presets=_tune_presets(), dtypes=(torch.bfloat16, torch.float32),
))

register(TunableKernel(
    name="fft_conv",
    default=lambda shape: _conv_default(shape, True), space=lambda shape: _conv_space(shape, True),
    make_inputs=_inputs,
    run=lambda inp, cfg: _conv_triton(inp["x"], plans.conv_plan(inp["x"].shape[1], True), cfg, k=inp["k"]),
    error=lambda inp, out: _check_rows(out, lambda i: reference.fft_conv_ref(inp["x"][i], inp["k"], True)),
    tolerance=_tune_tolerance, presets=_tune_presets(), dtypes=(torch.bfloat16, torch.float32),
))

register(TunableKernel(
    name="fnet_mix", default=_fnet_default, space=_fnet_space, make_inputs=_inputs,
    run=lambda inp, cfg: _fnet_triton(inp["x"], cfg),
    error=lambda inp, out: _check_rows(out, lambda i: reference.fnet_mix_ref(inp["x"][i])),
    tolerance=_tune_tolerance, presets=_tune_presets(), dtypes=(torch.bfloat16, torch.float32),
))
