"""Edge cases of the grouped ops found by fuzzing them as a mixture-of-experts / FFF user would call them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tritonlab
from tritonlab.kernels._backend import activation_and_grad

from helpers import rand


def test_ops_run_on_the_meta_device(backend):
    """Meta tensors (shape inference, a model built on the meta device) hold no ids: the ops give the
    output shape, forward and backward, as the other families' ops do, instead of failing in the
    index range check ("Cannot copy out of meta tensor")."""
    meta = torch.device("meta")
    t, k, g, d, h, o = 300, 2, 5, 8, 6, 7
    x = rand(3, t // 3, d).to(meta).requires_grad_()
    idx = torch.zeros(3, t // 3, k, dtype=torch.int64, device=meta)
    rw = torch.rand(3, t // 3, k).to(meta).requires_grad_()
    w = rand(g, d, o).to(meta).requires_grad_()
    y = tritonlab.gather_matmul_scatter(x, w, idx, None, rw, "relu", backend=backend)
    assert y.shape == (3, t // 3, o) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and rw.grad.shape == rw.shape
    with torch.no_grad():
        w1, w2 = rand(g, d, 2 * h).to(meta), rand(g, h, o).to(meta)
        y = tritonlab.leaf_mlp(x, idx, w1, None, w2, None, "swiglu", rw, backend=backend)
    assert y.shape == (3, t // 3, o) and y.is_meta
    layer = tritonlab.LeafMLP(g, d, h, o, "gelu", backend=backend, device=meta)
    layer(x, idx[..., 0]).sum().backward()
    assert layer.w1.grad.shape == layer.w1.shape and layer.w1.grad.is_meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gelu_tanh_gradient_stays_finite_for_large_preactivations(dtype):
    """The backward's activation derivative (torch fallback; on CUDA it runs in float16 for float16
    inputs): past |z| = 30 the tanh-GELU derivative is exactly 0 (negative z) or 1 (positive), never
    NaN from z * z overflowing float16. Moderate z keep the float64 derivative."""
    big = torch.tensor([-40000.0, -1000.0, -700.0, -100.0, -30.0, 30.0, 100.0, 700.0, 1000.0, 40000.0])
    _, da = activation_and_grad(big.to(dtype), "gelu_tanh")
    assert da.dtype == dtype
    assert torch.equal(da.float(), (big > 0).float()), da
    z = 4 * torch.randn(1000, dtype=torch.float64)
    c = 0.7978845608028654
    s = torch.sigmoid(2 * c * (z + 0.044715 * z**3))
    exact = s + 2 * c * z * s * (1 - s) * (1 + 3 * 0.044715 * z * z)
    _, da = activation_and_grad(z.float(), "gelu_tanh")
    # float32 arithmetic on terms of size <= ~10: a few ulps of 10
    assert (da.double() - exact).abs().max() < 1e-5
