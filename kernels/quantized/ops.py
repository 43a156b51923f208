"""Public quantized ops: validation, backend and path choice, Triton launchers, torch.library registration.

`quantize` and `scaled_matmul` run as `torch.library.custom_op`s (`tritonlab::quantize`,
`tritonlab::scaled_matmul`, and `tritonlab::scaled_matmul_quantized` for
`scaled_matmul(..., quantize_output=...)`) with fake implementations, so
`torch.compile(fullgraph=True)` keeps them in the graph. The Python wrappers validate (names in
every error), flatten and handle empty inputs; the custom ops pick the path and run. Eager calls
skip the dispatcher and run the ops' implementations directly (`_backend.dispatch`: it costs tens
of microseconds of host time a call) unless autograd must record `scaled_matmul`'s backward.

Gradients: `scaled_matmul` is differentiable in a_scale, b_scale and bias (one torch backward for
every path); the 8-bit operands and everything `quantize` or `quantize_output` returns have none
(rounded values), on every path and under torch.compile alike.

Paths (which implementation runs; `quantize_path` / `scaled_matmul_path` answer without running):
- "triton": the Triton kernels (the int8 quantize anywhere Triton runs, the int8 GEMM from CUDA
  compute capability 8.0; fp8 only where the hardware has FP8, compute capability >= 8.9; all of
  them under the interpreter).
- "torch-int8-exact": int8 GEMM as exact float32 K-chunk matmuls (the CPU path).
- "torch-int_mm": int8 GEMM through torch._int_mm (CUDA, when its shape limits allow).
- "torch-fp8-upcast": fp8 GEMM on the exact float32 upcast (CPU, GPUs without FP8, ROCm).
- "torch": quantize through torch ops.
`backend="triton"` with fp8 on hardware without FP8 falls back to "torch-fp8-upcast" (the numbers
agree within the float32 summation error), and an int8 GEMM below compute capability 8.0 to the
torch int8 paths (exact either way); the path functions say so.
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Union

import numpy as np
import torch

from .._accuracy import rel_error, tolerance
from .._backend import (FLOAT_DTYPES, SMALL_TILE, cdiv, check_activation, check_same_device, check_tensor,
                        compile_target, dispatch, empty_result, fit_pipelined_tiles, new_output, next_pow2,
                        resolve_backend)
from .._triton import interpreting
from .._tuning import NotApplicable, TunableKernel, lookup_config, register
from . import fallback, reference
from .fallback import QDTYPE, QMAX
from .triton_kernels import (KIND_E4M3, KIND_E5M2, KIND_INT8, quantize_cols_kernel, quantize_rows_kernel,
                             quantize_tensor_kernel, scaled_mm_kernel, tensor_amax_kernel)

GRANULARITIES = ("row", "column", "tensor")
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_QNAME_OF_DTYPE = {v: k for k, v in QDTYPE.items()}
#: (kernel kind code, mantissa bits, smallest normal exponent) of each quantized type
_GRID = {"int8": (KIND_INT8, 0, 0), "fp8_e4m3": (KIND_E4M3, 3, -6), "fp8_e5m2": (KIND_E5M2, 2, -14)}
_GRANULARITY_CODE = {"row": 0, "column": 1, "tensor": 2}
#: rows up to this many elements are quantized in one pass with the row held in registers
SINGLE_PASS_MAX_N = 16384
#: scaled_matmul(quantize_output=...) quantizes in the GEMM epilogue when one column tile of at most
#: this width spans the whole row
FUSED_QUANT_MAX_N = 256
#: int8 GEMMs accumulate in int32: K products of at most 128 * 128 each stay below 2**31 up to this K
INT8_MAX_K = (2**31 - 1) // (128 * 128)

QuantDType = Union[str, torch.dtype]


# ----------------------------------------------------------------------------- validation and paths

def _qname(dtype: QuantDType, name: str = "dtype") -> str:
    """'int8' | 'fp8_e4m3' | 'fp8_e5m2' from that name or the torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _QNAME_OF_DTYPE:
            return _QNAME_OF_DTYPE[dtype]
    elif isinstance(dtype, str) and dtype in QDTYPE:
        return dtype
    raise ValueError(f"{name} must be one of {tuple(QDTYPE)} (or torch.int8, torch.float8_e4m3fn, "
                     f"torch.float8_e5m2), got {dtype!r}")


def fp8_supported(device: torch.device) -> bool:
    """FP8 kernels run on CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell) and in the interpreter."""
    target = compile_target()
    if target is not None:
        return target.capability >= (8, 9)
    if device.type == "cuda":
        if getattr(torch.version, "hip", None):
            return False  # ROCm's fp8 types are the fnuz variants; the upcast path serves
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return interpreting()


def int8_gemm_supported(device: torch.device) -> bool:
    """The int8 GEMM kernel runs on CUDA compute capability >= 8.0 (Ampere on), on ROCm and in the
    interpreter. Below 8.0 (Turing: T4, RTX 20xx) Triton cannot lower an int8 tl.dot: every config
    fails in its TritonGPUAccelerateMatmul pass (`tritonlab compile-check --arch 75`). The int8
    quantize kernel has no dot and runs there."""
    target = compile_target()
    if target is not None:
        return target.capability >= (8, 0)
    if device.type == "cuda":
        return bool(getattr(torch.version, "hip", None)) or torch.cuda.get_device_capability(device) >= (8, 0)
    return interpreting()


def _kernel_backend(backend: str, device: torch.device, kernel_runs_here: Callable[[torch.device], bool]) -> str:
    """resolve_backend, then torch where the hardware cannot run the kernel (fp8 without FP8, the
    int8 GEMM below compute capability 8.0)."""
    chosen = resolve_backend(backend, device)
    if chosen == "triton" and not kernel_runs_here(device):
        return "torch"
    return chosen


def _quantize_runs_on(qname: str) -> Callable[[torch.device], bool]:
    return (lambda device: True) if qname == "int8" else fp8_supported


def quantize_path(x: torch.Tensor, dtype: QuantDType, *, backend: str = "auto") -> str:
    """'triton' or 'torch': which implementation `quantize(x, dtype, backend=backend)` runs."""
    return _kernel_backend(backend, x.device, _quantize_runs_on(_qname(dtype)))


def scaled_matmul_path(a_q: torch.Tensor, b_q: torch.Tensor, *, backend: str = "auto") -> str:
    """Which implementation `scaled_matmul(a_q, ..., b_q, ...)` runs: 'triton', 'torch-int8-exact',
    'torch-int_mm' or 'torch-fp8-upcast' (see the module docstring). A pair scaled_matmul refuses
    raises its error here too."""
    _check_operand_pair(a_q, b_q)
    return _gemm_path(a_q, b_q, backend)


def _gemm_path(a_q: torch.Tensor, b_q: torch.Tensor, backend: str) -> str:
    """scaled_matmul_path for operands already checked."""
    is_fp8 = a_q.dtype != torch.int8
    if _kernel_backend(backend, a_q.device, fp8_supported if is_fp8 else int8_gemm_supported) == "triton":
        return "triton"
    if is_fp8:
        return "torch-fp8-upcast"
    return "torch-int_mm" if fallback.int8_uses_int_mm(a_q, b_q) else "torch-int8-exact"


def _check_operand_pair(a_q: object, b_q: object) -> None:
    check_tensor("a_q", a_q, ndim=2, dtypes=QUANT_DTYPES)
    check_tensor("b_q", b_q, ndim=2, dtypes=QUANT_DTYPES)
    if (a_q.dtype == torch.int8) != (b_q.dtype == torch.int8):
        raise TypeError(f"b_q has dtype {b_q.dtype} but a_q has {a_q.dtype}: int8 pairs with int8, fp8 with fp8")
    if b_q.shape[1] != a_q.shape[1]:
        raise ValueError(f"b_q must be [N, K] with K = {a_q.shape[1]} (a_q's dim 1), got {tuple(b_q.shape)}")


def _check_scale(name: str, s: object, allowed: list[tuple[int, ...]], what: str) -> torch.Tensor:
    check_tensor(name, s, dtypes=FLOAT_DTYPES)
    if tuple(s.shape) not in allowed:
        shapes = ", ".join(str(a) for a in dict.fromkeys(allowed))
        raise ValueError(f"{name} must have shape {shapes} ({what}), got {tuple(s.shape)}")
    return s.reshape(-1).to(torch.float32).contiguous()


# ----------------------------------------------------------------------------- configs

def _quantize_default(shape) -> dict:
    m, n, g = shape["M"], shape["N"], shape["G"]
    if g == 0:  # rows
        bn = next_pow2(n) if next_pow2(n) <= SINGLE_PASS_MAX_N else 4096
        bm = max(1, min(next_pow2(m), 4096 // bn))
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": min(16, max(1, bm * bn // 1024))}
    if g == 1:  # columns
        return {"BLOCK_M": min(32, next_pow2(m)), "BLOCK_N": min(128, next_pow2(n)), "num_warps": 4}
    return {"BLOCK": min(4096, next_pow2(m * n)), "num_warps": 4}


def _quantize_space(shape) -> list[dict]:
    m, n, g = shape["M"], shape["N"], shape["G"]
    out = []
    if g == 0:
        full = next_pow2(n)
        for bn, bm, nw in itertools.product((1024, 2048, 4096, 8192, 16384), (1, 2, 4, 8), (1, 2, 4, 8, 16)):
            bn = min(bn, full)
            if bm > next_pow2(m) or bm * bn > 32768 or bm * bn < 32 * nw:
                continue
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw}
            if cfg not in out:
                out.append(cfg)
    elif g == 1:
        for bm, bn, nw in itertools.product((8, 16, 32, 64), (32, 64, 128, 256), (2, 4, 8)):
            if bm <= next_pow2(m) and bn <= next_pow2(n):
                out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw})
    else:
        for blk, nw in itertools.product((1024, 2048, 4096, 8192), (2, 4, 8, 16)):
            if blk <= next_pow2(m * n) and blk >= 32 * nw:
                out.append({"BLOCK": blk, "num_warps": nw})
    return out or [_quantize_default(shape)]


def _mm_default(shape) -> dict:
    m, n, k = shape["M"], shape["N"], shape["K"]
    bk = min(128, max(32, next_pow2(k)))  # 8-bit MMA needs K tiles >= 32
    if m <= 64:  # decode-like: thin row tiles, wide column tiles, deeper pipeline
        return {"BLOCK_M": max(16, next_pow2(m)), "BLOCK_N": min(128, max(16, next_pow2(n))), "BLOCK_K": bk,
                "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": min(256, max(16, next_pow2(n))), "BLOCK_K": bk, "GROUP_M": 8,
            "num_warps": 8, "num_stages": 3}


def _mm_space(shape) -> list[dict]:
    m, n, k = shape["M"], shape["N"], shape["K"]
    out = []
    for bm, bn, bk, nw, ns in itertools.product((16, 32, 64, 128, 256), (64, 128, 256), (64, 128, 256),
                                                (4, 8), (2, 3, 4, 5)):
        if bm > max(16, next_pow2(m)) or bn > max(64, next_pow2(n)) or bk > max(64, next_pow2(k)):
            continue
        if bm * bn > 128 * 256:  # accumulator registers
            continue
        if (bm * bk + bk * bn) * ns > 200 * 1024:  # shared memory of the pipelined 8-bit tiles
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": nw, "num_stages": ns})
    return out


# ----------------------------------------------------------------------------- Triton launchers

def _quantize_triton(x: torch.Tensor, qname: str, granularity: str, config: Optional[dict] = None):
    """x [M, N] contiguous, M, N >= 1."""
    m, n = x.shape
    kind, mant, emin = _GRID[qname]
    consts = dict(KIND=kind, QMAX=QMAX[qname], MANT=mant, EMIN=emin)
    g = _GRANULARITY_CODE[granularity]
    cfg = config or lookup_config("quantize", {"M": m, "N": n, "G": g}, x.dtype, x.device)
    q = new_output((m, n), QDTYPE[qname], x.device)
    if granularity == "row":
        scale = new_output((m, 1), torch.float32, x.device)
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        quantize_rows_kernel[(cdiv(m, bm),)](
            x, q, scale, m, n, x.stride(0), q.stride(0), **consts,
            BLOCK_M=bm, BLOCK_N=bn, SINGLE_PASS=bn >= n, num_warps=cfg["num_warps"])
    elif granularity == "column":
        scale = new_output((1, n), torch.float32, x.device)
        quantize_cols_kernel[(cdiv(n, cfg["BLOCK_N"]),)](
            x, q, scale, m, n, x.stride(0), q.stride(0), **consts,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    else:
        numel = m * n
        scale = new_output((), torch.float32, x.device)
        amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)  # device word, no host sync
        grid = (cdiv(numel, cfg["BLOCK"]),)
        tensor_amax_kernel[grid](x, amax_bits, numel, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        quantize_tensor_kernel[grid](x, q, scale, amax_bits, numel, **consts, BLOCK=cfg["BLOCK"],
                                     num_warps=cfg["num_warps"])
    return q, scale


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.int8: tl.int8, torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5,
            torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _scaled_mm_triton(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                      bias: Optional[torch.Tensor], activation: Optional[str], out_dtype: torch.dtype,
                      config: Optional[dict] = None, quant_out: Optional[str] = None):
    """a [M, K], b [N, K] (M, N >= 1), a_s [M] | [1], b_s [N] | [1] float32, bias [N] or None.
    Returns C [M, N] out_dtype, or with quant_out (N <= FUSED_QUANT_MAX_N) (q [M, N], scale [M, 1])."""
    m, k = a.shape
    n = b.shape[0]
    cfg = config or lookup_config("scaled_matmul", {"M": m, "N": n, "K": k}, a.dtype, a.device)
    if quant_out is not None:
        cfg = dict(cfg, BLOCK_N=max(16, next_pow2(n)))  # one column tile per row
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, 128 * 256 // cfg["BLOCK_N"]))
        if cfg["BLOCK_M"] * cfg["BLOCK_N"] < SMALL_TILE:  # a narrow layer's tile (see SMALL_TILE)
            cfg["num_warps"] = min(cfg["num_warps"], 4)
    # every config is fitted, the tuner's too: the fit is a function of (config, device), so a tuned
    # entry runs later exactly as it was measured, and a config too big for this GPU still launches
    cfg = fit_pipelined_tiles(cfg, 1, a.device)  # 8-bit A and B tiles
    quant = {}
    if quant_out is not None:
        kind, mant, emin = _GRID[quant_out]
        quant = dict(QUANT_OUT=True, KIND=kind, QMAX=QMAX[quant_out], MANT=mant, EMIN=emin)
        c = new_output((m, n), QDTYPE[quant_out], a.device)
        c_scale = new_output((m, 1), torch.float32, a.device)
    else:
        c = new_output((m, n), out_dtype, a.device)
        c_scale = c
    is_int8 = a.dtype == torch.int8
    # The interpreter cannot fill masked fp8 lanes with a float zero: hand it the bytes instead.
    load_bits = not is_int8 and interpreting()
    a_arg, b_arg = (a.view(torch.uint8), b.view(torch.uint8)) if load_bits else (a, b)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (cdiv(m, bm) * cdiv(n, bn),)
    scaled_mm_kernel[grid](
        a_arg, b_arg, a_s, b_s, a_s if bias is None else bias, c, c_scale, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        IS_INT8=is_int8, A_PER_ROW=a_s.numel() > 1, B_PER_COL=b_s.numel() > 1, HAS_BIAS=bias is not None,
        ACT=check_activation(activation), LOAD_BITS=load_bits, INT_FILL=is_int8 or load_bits,
        A_TY=_tl_dtype(a.dtype), B_TY=_tl_dtype(b.dtype), Y_TY=_tl_dtype(out_dtype),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=(k % bk == 0),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **quant)
    return (c, c_scale) if quant_out is not None else c


# ----------------------------------------------------------------------------- custom ops

def _scale_shape(granularity: str, m: int, n: int) -> tuple[int, ...]:
    return {"row": (m, 1), "column": (1, n), "tensor": ()}[granularity]


def _quantize_impl(x: torch.Tensor, qname: str, granularity: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if _kernel_backend(backend, x.device, _quantize_runs_on(qname)) == "triton":
        return _quantize_triton(x, qname, granularity)
    return fallback.quantize_torch(x, qname, granularity)


_quantize_op = torch.library.custom_op("tritonlab::quantize", _quantize_impl, mutates_args=())


@_quantize_op.register_fake
def _(x, qname, granularity, backend):
    m, n = x.shape
    return x.new_empty((m, n), dtype=QDTYPE[qname]), x.new_empty(_scale_shape(granularity, m, n), dtype=torch.float32)


def _scaled_matmul_impl(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype,
                      backend: str) -> torch.Tensor:
    if _gemm_path(a_q, b_q, backend) == "triton":
        return _scaled_mm_triton(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype)
    return fallback.scaled_matmul_torch(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype)


_scaled_matmul_op = torch.library.custom_op("tritonlab::scaled_matmul", _scaled_matmul_impl, mutates_args=())


@_scaled_matmul_op.register_fake
def _(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype, backend):
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


def _scaled_matmul_setup_context(ctx, inputs, output):
    a_q, a_scale, b_q, b_scale, bias, activation, out_dtype, backend = inputs
    ctx.save_for_backward(a_q, a_scale, b_q, b_scale, bias)
    ctx.activation = activation


def _scaled_matmul_backward(ctx, grad):
    a_q, a_scale, b_q, b_scale, bias = ctx.saved_tensors
    d_a, d_b, d_bias = fallback.scaled_matmul_backward_torch(grad, a_q, a_scale, b_q, b_scale, bias, ctx.activation)
    return None, d_a, None, d_b, d_bias, None, None, None


# Without it the torch path's eager autograd gave scale and bias gradients, the Triton path none, and
# torch.compile failed to trace a call with a requires_grad bias or scale: one backward for all.
_scaled_matmul_op.register_autograd(_scaled_matmul_backward, setup_context=_scaled_matmul_setup_context)


def _scaled_matmul_quantized_impl(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                                bias: Optional[torch.Tensor], activation: str, out_dtype: torch.dtype, qname: str,
                                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    path = _gemm_path(a_q, b_q, backend)
    fusable = b_q.shape[0] <= FUSED_QUANT_MAX_N and quantize_path(a_q, qname, backend=backend) == "triton"
    if path == "triton" and fusable:
        return _scaled_mm_triton(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype, quant_out=qname)
    if path == "triton":
        y = _scaled_mm_triton(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype)
    else:
        y = fallback.scaled_matmul_torch(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype)
    if quantize_path(y, qname, backend=backend) == "triton":
        return _quantize_triton(y, qname, "row")
    return fallback.quantize_torch(y, qname, "row")


_scaled_matmul_quantized_op = torch.library.custom_op("tritonlab::scaled_matmul_quantized", _scaled_matmul_quantized_impl,
                                                      mutates_args=())


@_scaled_matmul_quantized_op.register_fake
def _(a_q, a_scale, b_q, b_scale, bias, activation, out_dtype, qname, backend):
    m, n = a_q.shape[0], b_q.shape[0]
    return a_q.new_empty((m, n), dtype=QDTYPE[qname]), a_q.new_empty((m, 1), dtype=torch.float32)


# ----------------------------------------------------------------------------- public API

def quantize(x: torch.Tensor, dtype: QuantDType, granularity: str = "row", *, check_finite: bool = False,
             backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization with float32 scales: x ~= q * scale.

    Args:
        x: [..., N] float32/float16/bfloat16. Rows are the slices along the last dim (tokens), columns
            run over all leading dims.
        dtype: "int8" | "fp8_e4m3" | "fp8_e5m2" (or torch.int8 / float8_e4m3fn / float8_e5m2).
        granularity: "row" (one scale per row), "column" (one per column), "tensor" (one scale).
        check_finite: raise ValueError if x holds a NaN or inf (a host sync; off by default).
        backend: "auto" | "triton" | "torch".
    Returns:
        (q, scale): q has x's shape and the quantized dtype; scale is float32 and keeps x's rank:
        [..., 1] for rows, [1, ..., 1, N] for columns, 0-d for the tensor.
        scale = amax / qmax (qmax 127, 448, 57344), at least 2**-126 (the smallest normal float32, so
        that 1 / scale stays finite for tiny slices), 1 for an all-zero slice; q = x * (1 / scale) in
        float32, clamped to [-qmax, qmax] and rounded half to even (int8) or to the nearest fp8 value
        (ties to even). A slice holding NaN gets a NaN scale (inf: an inf scale) and zeros in q, so
        q * scale is NaN there: a non-finite value spoils only its own slice. Tensor granularity
        needs no host sync (the amax stays on the device). q and scale carry no gradient.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    qname = _qname(dtype)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim [..., N], got a 0-d tensor")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf values (check_finite=True)")
    n = x.shape[-1]
    m = x.numel() // n if n else int(np.prod(x.shape[:-1]))
    lead = tuple(x.shape[:-1])
    rank = x.dim()
    scale_shape = {"row": lead + (1,), "column": (1,) * (rank - 1) + (n,), "tensor": ()}[granularity]
    resolve_backend(backend, x.device)  # validates backend even for empty inputs
    if m == 0 or n == 0:
        q = torch.zeros(x.shape, dtype=QDTYPE[qname], device=x.device)
        return q, torch.ones(scale_shape, dtype=torch.float32, device=x.device)
    # detached: q and scale have no gradient on any path (the torch path runs under no_grad), and the
    # custom op has no backward, so torch.compile failed to trace a call on a requires_grad x
    q, scale = dispatch(_quantize_op, _quantize_impl, x.detach().reshape(m, n).contiguous(), qname, granularity,
                        backend)
    return q.reshape(x.shape), scale.reshape(scale_shape)


def scaled_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                  out_dtype: torch.dtype = torch.bfloat16, *, quantize_output: Optional[QuantDType] = None,
                  backend: str = "auto"):
    """act((a_q @ b_q.T) * a_scale * b_scale + bias) in out_dtype.

    Args:
        a_q: [M, K] int8, float8_e4m3fn or float8_e5m2 (e.g. activations quantized per token).
        a_scale: float [M, 1], [M] or 0-d.
        b_q: [N, K] (the nn.Linear weight layout); int8 with int8 a_q, either fp8 type with fp8 a_q.
        b_scale: float [1, N], [N], 0-d, or [N, 1] (what `quantize(weight)` gives per output channel).
        bias: float [N] or None.
        activation: None | "relu" | "gelu" | "gelu_tanh" | "silu".
        out_dtype: torch.bfloat16 | torch.float16 | torch.float32.
        quantize_output: None, or a quantized dtype ("int8" | "fp8_e4m3" | "fp8_e5m2") to quantize the
            result per row for the next layer (as `quantize(y, quantize_output, "row")`).
        backend: "auto" | "triton" | "torch" (`scaled_matmul_path` tells which path runs).
    Returns:
        [M, N] out_dtype. int8 products accumulate exactly in int32, fp8 ones in float32; the epilogue
        (scales, bias, activation) runs in float32 on the accumulator.
        Differentiable in a_scale, b_scale and bias (the same torch backward on every path; the
        out_dtype rounding passes gradients straight through); a_q and b_q get no gradient.
        int8 needs K <= INT8_MAX_K (131071), where the int32 sums cannot overflow.
        With quantize_output: (q [M, N], scale [M, 1] float32) instead, without gradients. On the
        Triton path with N <= 256 (one tile spans the row) the epilogue rounds y to out_dtype and
        quantizes it in registers (y is never written); otherwise y is stored in out_dtype and then
        quantized. Either way q and scale equal quantize(scaled_matmul(...), quantize_output, "row").
    """
    _check_operand_pair(a_q, b_q)
    m, k = a_q.shape
    n = b_q.shape[0]
    if a_q.dtype == torch.int8 and k > INT8_MAX_K:  # past it the int32 sums can wrap: silently wrong signs
        raise ValueError(f"a_q: int8 GEMMs accumulate exactly in int32, which holds K <= {INT8_MAX_K}, got K = {k}; "
                         "split K into chunks or use fp8")
    a_s = _check_scale("a_scale", a_scale, [(m, 1), (m,), ()], "per row of a_q, or one scale")
    b_s = _check_scale("b_scale", b_scale, [(1, n), (n,), (), (n, 1)], "per row of b_q, or one scale")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    check_activation(activation)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    check_same_device(a_q=a_q, a_scale=a_scale, b_q=b_q, b_scale=b_scale, bias=bias)
    resolve_backend(backend, a_q.device)
    if quantize_output is not None:
        qname = _qname(quantize_output, "quantize_output")
        if m == 0 or n == 0:
            return (torch.zeros(m, n, dtype=QDTYPE[qname], device=a_q.device),
                    torch.ones(m, 1, dtype=torch.float32, device=a_q.device))
        # quantized outputs have no gradient (as quantize's): detached, so torch.compile traces the op
        # (it has no backward) on requires_grad scales or bias
        return dispatch(_scaled_matmul_quantized_op, _scaled_matmul_quantized_impl, a_q.detach().contiguous(),
                        a_s.detach(), b_q.detach().contiguous(), b_s.detach(), None if bias is None else bias.detach(),
                        activation or "none", out_dtype, qname, backend)
    if m == 0 or n == 0:  # still joined to the scales' and bias's graph: their gradients are zeros
        return empty_result((m, n), a_s.new_empty(0, dtype=out_dtype), a_s, b_s, bias)
    return dispatch(_scaled_matmul_op, _scaled_matmul_impl, a_q.contiguous(), a_s, b_q.contiguous(), b_s, bias,
                    activation or "none", out_dtype, backend, needs_autograd=True)


# ----------------------------------------------------------------------------- tuning registry

def _quantize_inputs(shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (3.0 * torch.randn(shape["M"], shape["N"], generator=g)).to(device=device, dtype=dtype)
    return {"x": x, "granularity": GRANULARITIES[shape["G"]]}


def _quantize_run(inp, cfg):
    q, scale = _quantize_triton(inp["x"], "int8", inp["granularity"], cfg)
    return q.float() * scale  # dequantized: a wrong q or a wrong scale both show


def _quantize_error(inp, out) -> float:
    q, s = reference.quantize_ref(inp["x"].float().cpu().numpy(), "int8", inp["granularity"])
    expected = q.astype(np.float32) * s  # the same float32 products as _quantize_run's
    return float(np.mean(out.cpu().numpy() != expected)) if expected.size else 0.0


register(TunableKernel(
    name="quantize", default=_quantize_default, space=_quantize_space, make_inputs=_quantize_inputs,
    run=_quantize_run, error=_quantize_error, tolerance=lambda dtype: 0.0,
    presets={"small": [{"M": 37, "N": 100, "G": 0}, {"M": 37, "N": 100, "G": 1}, {"M": 37, "N": 100, "G": 2}],
             "models": [{"M": 4096, "N": 4096, "G": 0}, {"M": 4096, "N": 14336, "G": 0},
                        {"M": 8192, "N": 8192, "G": 0}, {"M": 14336, "N": 4096, "G": 0},
                        {"M": 4096, "N": 14336, "G": 2}],
             "full": [{"M": mm, "N": nn, "G": g} for mm in (1, 64, 4096, 16384) for nn in (768, 4096, 14336, 32768)
                      for g in (0, 1, 2)]},
    dtypes=(torch.bfloat16, torch.float32),
))


def _mm_inputs(shape, dtype, device):
    """Quantized operands (through the torch quantizer) of Gaussian activations and weights."""
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        qname = _qname(dtype)
    except ValueError as e:  # `--dtype float32` asked of every kernel: this one takes 8-bit operands only
        raise NotApplicable(f"scaled_matmul tunes 8-bit operand dtypes: {e}") from None
    if qname.startswith("fp8") and not fp8_supported(device):
        raise NotApplicable(f"{qname} GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell): "
                            "Triton has no e4m3 type below it")
    if qname == "int8" and not int8_gemm_supported(device):
        raise NotApplicable("int8 GEMMs need compute capability >= 8.0: Triton cannot lower an int8 dot below it")
    x = torch.randn(shape["M"], shape["K"], generator=g).to(device)
    w = (shape["K"] ** -0.5 * torch.randn(shape["N"], shape["K"], generator=g)).to(device)
    a_q, a_s = fallback.quantize_torch(x, qname, "row")
    b_q, b_s = fallback.quantize_torch(w, qname, "row")
    bias = (0.1 * torch.randn(shape["N"], generator=g)).to(device)
    return {"a_q": a_q, "a_s": a_s.reshape(-1), "b_q": b_q, "b_s": b_s.reshape(-1), "bias": bias, "_ref": []}


def _mm_run(inp, cfg):
    return _scaled_mm_triton(inp["a_q"], inp["a_s"], inp["b_q"], inp["b_s"], inp["bias"], None, torch.bfloat16, cfg)


def quantized_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A quantized torch tensor as the NumPy array the references take (int8 or ml_dtypes fp8)."""
    t = t.detach().cpu()
    if t.dtype == torch.int8:
        return t.numpy()
    return t.view(torch.uint8).numpy().view(reference.NP_QDTYPE[_QNAME_OF_DTYPE[t.dtype]])


def _mm_error(inp, out) -> float:
    if not inp["_ref"]:  # the float64 reference is computed once per inputs and kept
        inp["_ref"].append(reference.scaled_matmul_ref(
            quantized_to_numpy(inp["a_q"]), inp["a_s"].cpu().numpy(), quantized_to_numpy(inp["b_q"]),
            inp["b_s"].cpu().numpy(), inp["bias"].cpu().numpy()))
    return rel_error(out, inp["_ref"][0])


register(TunableKernel(
    name="scaled_matmul", default=_mm_default, space=_mm_space, make_inputs=_mm_inputs, run=_mm_run,
    error=_mm_error, tolerance=lambda dtype: tolerance(torch.bfloat16),  # output rounding dominates
    presets={"small": [{"M": 37, "N": 50, "K": 72}],
             "models": [{"M": 8192, "N": 8192, "K": 8192},
                        {"M": 4096, "N": 14336, "K": 4096}, {"M": 4096, "N": 4096, "K": 14336}],
             "full": [{"M": mm, "N": nn, "K": kk} for mm in (16, 128, 1024, 4096, 8192)
                      for nn, kk in ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192))]},
    dtypes=(torch.int8, torch.float8_e4m3fn),
))
