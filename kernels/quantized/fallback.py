"""Torch fallbacks for the quantized family: vectorized, same quantization rule as the kernels.

- `quantize_torch`: the rule of triton_kernels.py in torch ops (float32 throughout; `torch.round`
  rounds half to even; torch's float -> float8 cast rounds to nearest even, after the clamp).
- `int8_matmul_exact`: a_q @ b_q.T as exact int32. `torch._int_mm` on CUDA where its shape limits
  allow; elsewhere float32 matmuls over K chunks of 1024: every product of two int8 values and
  every partial sum of a chunk (|sum| <= 1024 * 127**2 < 2**24) is an integer that float32 holds
  exactly, whatever the summation order or TF32 use, so each chunk converts to int32 without
  loss. (`torch._int_mm` exists on the CPU too but is a naive loop there, ~30x slower than BLAS.)
- `fp8_matmul`: fp8 values upcast to float32 are exact and so are their products; the sum is
  float32 like the tensor-core kernel's (TF32 is harmless: fp8 values fit its 10-bit mantissa).
- `epilogue_torch`: (acc * a_scale) * b_scale + bias, activation, cast; the kernel's order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._backend import activation_and_grad, cpu_workspace, torch_activation

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
#: the smallest scale of a non-zero slice, 2**-126 (the smallest normal float32): its reciprocal is
#: finite, where a subnormal amax / qmax would overflow 1 / scale and saturate every q
MIN_SCALE = 2.0**-126
QDTYPE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
#: K chunk for the exact float32 int8 path: 1024 * 127 * 127 < 2**24
EXACT_K_CHUNK = 1024


@torch.no_grad()  # rounding has no gradient; the in-place steps need no autograd record
def quantize_torch(x: torch.Tensor, qname: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] (M, N >= 1) -> (q [M, N], scale [M, 1] | [1, N] | 0-d float32)."""
    qmax = QMAX[qname]
    xf = x.float()
    # max |x| as max(max x, -min x): two reads of x and no |x| temporary; both propagate NaN
    if granularity == "row":
        amax = torch.maximum(xf.amax(dim=1, keepdim=True), xf.amin(dim=1, keepdim=True).neg_())
    elif granularity == "column":
        amax = torch.maximum(xf.amax(dim=0, keepdim=True), xf.amin(dim=0, keepdim=True).neg_())
    else:
        amax = torch.maximum(xf.amax(), xf.amin().neg_())
    # A tensor divisor, not the Python float: CUDA torch turns division by a host scalar into a
    # multiplication by its reciprocal, which is off by one ulp for some amax (seen on an H100).
    scale = amax / torch.full((), qmax, device=amax.device)
    scale = torch.where(amax == 0, 1.0, torch.where(scale < MIN_SCALE, MIN_SCALE, scale))  # NaN stays NaN
    # one float32 buffer, updated in place: x's own conversion when it was not float32 already,
    # else a reused CPU workspace (q is what leaves)
    inv = 1.0 / scale
    v = xf.mul_(inv) if xf is not x else torch.mul(xf, inv, out=cpu_workspace("quantize", xf.shape, xf.dtype, xf.device))
    # NaN or inf reach v only through a non-finite scale or reciprocal (a row holding NaN or inf, or
    # a denormal amax): on the CPU a look at the few scales skips that full pass when none is
    if x.device.type != "cpu" or not bool(torch.isfinite(scale).all() & torch.isfinite(inv).all()):
        v.nan_to_num_(nan=0.0, posinf=qmax, neginf=-qmax)
    v.clamp_(-qmax, qmax)
    if qname == "int8":
        return v.round_().to(torch.int8), scale
    return v.to(QDTYPE[qname]), scale


def int8_matmul_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b.T for int8 a [M, K], b [N, K]."""
    m, k = a.shape
    n = b.shape[0]
    if int8_uses_int_mm(a, b):
        return torch._int_mm(a, b.t())
    if k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    acc: Optional[torch.Tensor] = None
    for k0 in range(0, k, EXACT_K_CHUNK):  # a handful of K chunks, not a loop over tokens
        part = a[:, k0:k0 + EXACT_K_CHUNK].float() @ b[:, k0:k0 + EXACT_K_CHUNK].float().t()
        acc = part.to(torch.int32) if acc is None else acc.add_(part.to(torch.int32))
    return acc


def int8_uses_int_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._int_mm's CUDA limits: M > 16, K and N multiples of 8."""
    m, k = a.shape
    n = b.shape[0]
    return a.is_cuda and m > 16 and k > 0 and k % 8 == 0 and n % 8 == 0


def fp8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 a @ b.T for fp8 a [M, K], b [N, K] (exact products, float32 sums)."""
    return a.float() @ b.float().t()


def epilogue_torch(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: Optional[torch.Tensor], activation: Optional[str], out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N]; a_scale [M] or [1], b_scale [N] or [1] float32; bias [N] or None.

    acc is consumed: a float32 acc is scaled in place (the caller's fresh matmul result; a new
    [M, N] buffer per step costs a page fault per 4 KB on the CPU)."""
    y = acc.float() if acc.dtype != torch.float32 else acc
    y.mul_(a_scale.reshape(-1, 1)).mul_(b_scale.reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    if activation == "relu":
        y.relu_()
    elif activation == "silu":
        F.silu(y, inplace=True)
    else:
        y = torch_activation(y, activation)
    return y.to(out_dtype)


def scaled_matmul_torch(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                        bias: Optional[torch.Tensor], activation: Optional[str],
                        out_dtype: torch.dtype) -> torch.Tensor:
    """act((a_q @ b_q.T) * a_scale * b_scale + bias) in out_dtype; scales already 1-D float32."""
    return epilogue_torch(_accumulate(a_q, b_q), a_scale, b_scale, bias, activation, out_dtype)


def _accumulate(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """a_q @ b_q.T: exact int32 (or the exact integers in float32) for int8, float32 for fp8."""
    if a_q.dtype != torch.int8:
        return fp8_matmul(a_q, b_q)
    if a_q.shape[1] <= EXACT_K_CHUNK and not int8_uses_int_mm(a_q, b_q):
        return a_q.float() @ b_q.float().t()  # one chunk: already the exact integers, in float32
    return int8_matmul_exact(a_q, b_q)


def scaled_matmul_backward_torch(grad: torch.Tensor, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor,
                                 b_scale: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str]):
    """Gradients of scaled_matmul in a_scale ([M] or [1]), b_scale ([N] or [1]) and bias ([N] or None),
    every path's backward: z = acc * a_scale * b_scale + bias (acc recomputed, as the forward forms it),
    dz = grad * act'(z), the out_dtype rounding passed straight through. The 8-bit operands get none."""
    acc = _accumulate(a_q, b_q).float()
    a_col, b_row = a_scale.reshape(-1, 1), b_scale.reshape(1, -1)
    dz = grad.float()
    if activation not in (None, "none", "identity"):  # (the identity skips forming z: two [M, N] temporaries)
        z = acc * a_col * b_row
        dz = dz * activation_and_grad(z if bias is None else z + bias.float(), activation)[1]
    d_acc = dz * acc
    d_a, d_b = (d_acc * b_row).sum(1), (d_acc * a_col).sum(0)
    # one scale for all rows (columns): the sum of the per-row (per-column) gradients
    d_a = d_a if a_scale.numel() == d_a.numel() else d_a.sum().reshape(1)
    d_b = d_b if b_scale.numel() == d_b.numel() else d_b.sum().reshape(1)
    return d_a, d_b, None if bias is None else dz.sum(0).to(bias.dtype)
