"""Edge cases of the quantized ops found by fuzzing them against the NumPy references: gradients of
scaled_matmul on every path, torch.compile on requires_grad inputs, empty batches that backpropagate,
and int8 GEMMs whose int32 sums could overflow."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import tritonlab
from tritonlab.kernels.quantized import ops

from helpers import rand, tolerance

_ACT64 = {None: lambda z: z, "relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu,
          "gelu_tanh": lambda z: nn.functional.gelu(z, approximate="tanh")}


def _formula64(a_q, b_q, activation):
    """act((a_q @ b_q.T) * a_scale * b_scale + bias) in float64, as a function of the float inputs."""
    acc = a_q.double() @ b_q.double().t()

    def f(a_scale, b_scale, bias):
        z = acc * a_scale.reshape(-1, 1) * b_scale.reshape(1, -1) + bias
        return _ACT64[activation](z)
    return f


@pytest.mark.parametrize("qname", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("case", [(6, 7, 45, "col", "row_n1", "gelu"), (1, 5, 20, "scalar", "row_1n", "silu"),
                                  (9, 3, 33, "vec", "scalar", None)], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[5]}")
def test_scaled_matmul_gradients_are_the_same_on_every_path(backend, device, qname, case):
    """scaled_matmul is differentiable in a_scale, b_scale and bias. The torch path's eager autograd
    gave these gradients, the Triton path gave none (an output without grad_fn), and torch.compile
    failed to trace a call with a requires_grad bias; all three now agree with float64 autograd."""
    m, n, k, a_form, b_form, act = case
    a_q, a_s = tritonlab.quantize(rand(m, k, device=device), qname, backend="torch")
    b_q, b_s = tritonlab.quantize(rand(n, k, device=device), qname, backend="torch")
    a_s = {"col": a_s, "vec": a_s.reshape(-1), "scalar": a_s.reshape(-1)[0]}[a_form]
    b_s = {"row_n1": b_s, "row_1n": b_s.reshape(1, -1), "scalar": b_s.reshape(-1)[0]}[b_form]
    bias = rand(n, device=device, dtype=torch.bfloat16)
    dy = rand(m, n, device=device)
    ref = [t.detach().double().requires_grad_() for t in (a_s, b_s, bias)]
    _formula64(a_q, b_q, act)(*ref).backward(dy.double())
    # each gradient is a sum of terms that may cancel (a scalar scale's sums a whole row): float32
    # rounding is bounded relative to the sum of the terms' magnitudes, not to the sum itself
    terms = [t.detach().double().abs().requires_grad_() for t in (a_s, b_s, bias)]
    acc = (a_q.double() @ b_q.double().t()).abs()
    z = [t.detach().double() for t in (a_s, b_s, bias)]
    z = (a_q.double() @ b_q.double().t()) * z[0].reshape(-1, 1) * z[1].reshape(1, -1) + z[2]
    z.requires_grad_()
    (slope,) = torch.autograd.grad(_ACT64[act](z), z, torch.ones_like(z))
    (acc * terms[0].reshape(-1, 1) * terms[1].reshape(1, -1) + terms[2]).backward(slope.abs() * dy.double().abs())

    def run(a_scale, b_scale, bias):
        return tritonlab.scaled_matmul(a_q, a_scale, b_q, b_scale, bias, act, torch.float32, backend=backend)

    torch._dynamo.reset()  # one code object for every parametrization: no recompile limit
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="aot_eager")
    for fn in (run, compiled):
        ours = [t.detach().clone().requires_grad_() for t in (a_s, b_s, bias)]
        y = fn(*ours)
        assert y.requires_grad, "no graph to the scales and bias"
        y.backward(dy)
        for name, t, r, mag in zip(("a_scale", "b_scale", "bias"), ours, ref, terms):
            assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == t.dtype, name
            err = (t.grad.double() - r.grad).abs()
            bound = 4 * tolerance(t.dtype) * (mag.grad + r.grad.abs())
            assert torch.all(err <= bound), f"grad of {name}: {(err / bound).max().item():.3g} of the bound"


def test_scaled_matmul_empty_batch_backpropagates(backend, device):
    """M = 0 or N = 0: zero gradients for the scales and bias, not a backward that fails."""
    for m, n in [(0, 6), (4, 0)]:
        a_q, a_s = tritonlab.quantize(rand(m, 16, device=device), "int8", backend="torch")
        b_q, b_s = tritonlab.quantize(rand(n, 16, device=device), "int8", backend="torch")
        ins = [t.clone().requires_grad_() for t in (a_s, b_s, rand(n, device=device))]
        y = tritonlab.scaled_matmul(a_q, ins[0], b_q, ins[1], ins[2], "gelu", torch.float32, backend=backend)
        assert y.shape == (m, n)
        y.sum().backward()
        for t in ins:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("qname", ["int8", "fp8_e5m2"])
def test_compiled_quantize_and_ffn_on_requires_grad_inputs(device, qname):
    """quantize and scaled_matmul(quantize_output=...) have no backward: torch.compile raised 'no
    autograd formula was registered' while tracing them on a requires_grad x (a QuantizedFFN after any
    trainable layer, outside torch.no_grad) or bias. Their outputs carry no gradient, as in eager."""
    x = rand(5, 24, device=device).requires_grad_()
    ffn = tritonlab.QuantizedFFN.from_float(nn.Linear(24, 40), nn.Linear(40, 12), "gelu", qname, backend="torch")
    b_q, b_s = tritonlab.quantize(rand(40, 24, device=device), qname, backend="torch")
    bias = rand(40, device=device).requires_grad_()

    def layer(x, bias):
        x_q, x_s = tritonlab.quantize(x, qname, "row", backend="torch")
        h_q, h_s = tritonlab.scaled_matmul(x_q, x_s, b_q, b_s, bias, "relu", quantize_output=qname, backend="torch")
        return x_q, x_s, h_q, h_s, ffn.to(device)(x)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for got, want in zip(compiled(x, bias), layer(x, bias)):
        assert not got.requires_grad and not want.requires_grad
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_int8_gemm_k_past_int32_range_is_an_error(backend, device):
    """int8 sums accumulate in int32: at K = 140000 all-127 operands summed to -2.04e9 on both paths
    (2.26e9 wrapped). K past INT8_MAX_K is a ValueError naming a_q; up to it the sums are exact."""
    k = ops.INT8_MAX_K + 1 + int(torch.randint(0, 1000, ()))
    a_q = torch.randint(100, 128, (1, k), dtype=torch.int8, device=device)
    one = torch.ones((), device=device)
    with pytest.raises(ValueError, match="a_q"):
        tritonlab.scaled_matmul(a_q, one, a_q, one, out_dtype=torch.float32, backend=backend)
    if backend == "torch":  # the boundary itself, worst case (-128 * -128 each): exact (the interpreter is slow here)
        a_q = torch.full((1, ops.INT8_MAX_K), -128, dtype=torch.int8, device=device)
        y = tritonlab.scaled_matmul(a_q, one, a_q, one, out_dtype=torch.float32, backend=backend)
        assert y.item() == float(ops.INT8_MAX_K * 128 * 128)
