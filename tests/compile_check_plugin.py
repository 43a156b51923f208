"""Tunable kernels for test_compile_check (imported by `tritonlab compile-check --import`): one that
compiles cleanly, one whose tiles need more shared memory than any GPU has (it compiles, but could
never launch), and one whose launcher raises."""
from __future__ import annotations

import torch

from tritonlab.kernels._triton import jit, tl
from tritonlab.kernels._tuning import TunableKernel, register


@jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


@jit
def _big_tile_matmul_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


def _copy_inputs(shape, dtype, device):
    x = torch.randn(shape["N"], device=device).to(dtype)
    return x, torch.empty_like(x)


def _copy_run(inputs, cfg):
    x, y = inputs
    _copy_kernel[(-(-x.numel() // cfg["BLOCK"]),)](x, y, x.numel(), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return y


def _matmul_inputs(shape, dtype, device):
    k = shape["K"]
    return (torch.randn(128, k, device=device, dtype=dtype), torch.randn(k, 128, device=device, dtype=dtype),
            torch.empty(128, 128, device=device, dtype=torch.float32))


def _matmul_run(inputs, cfg):
    # fp32 128x64 A and 64x128 B tiles: 64 KB a pipeline stage, so 4 stages need 256 KB
    a, b, c = inputs
    _big_tile_matmul_kernel[(1,)](a, b, c, a.shape[1], BM=128, BN=128, BK=cfg["BK"], num_warps=4,
                                  num_stages=cfg["num_stages"])
    return c


def _raise(inputs, cfg):
    raise ValueError("this launcher always fails")


_common = dict(error=lambda inputs, out: 0.0, tolerance=lambda dtype: 1.0, dtypes=(torch.float32,))

register(TunableKernel(name="cc_copy", default=lambda s: {"BLOCK": 128, "num_warps": 4},
                       space=lambda s: [{"BLOCK": 128, "num_warps": 4}, {"BLOCK": 1024, "num_warps": 8}],
                       make_inputs=_copy_inputs, run=_copy_run, presets={"small": [{"N": 1000}]}, **_common))
register(TunableKernel(name="cc_big_tiles", default=lambda s: {"BK": 64, "num_stages": 4},
                       space=lambda s: [{"BK": 64, "num_stages": 4}],
                       make_inputs=_matmul_inputs, run=_matmul_run, presets={"small": [{"K": 512}]}, **_common))
register(TunableKernel(name="cc_raises", default=lambda s: {"BLOCK": 64}, space=lambda s: [{"BLOCK": 64}],
                       make_inputs=_copy_inputs, run=_raise, presets={"small": [{"N": 10}]}, **_common))
