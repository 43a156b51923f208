"""quantize, scaled_matmul and QuantizedFFN against the NumPy references, both backends.

Quantized values must equal the reference exactly (the kernels round in float32 arithmetic, so
this holds under the interpreter as on a GPU); int8 GEMMs are exact before scaling; the FFN's
error against the float64 FFN is measured as SQNR in dB and must match the quantization error of
the same pipeline simulated in NumPy.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tritonlab
from tritonlab.kernels import _backend
from tritonlab.kernels._tuning import NotApplicable, registered
from tritonlab.kernels.quantized import ops
from tritonlab.kernels.quantized import reference as ref
from tritonlab.kernels.quantized.ops import quantized_to_numpy

from helpers import DTYPES, assert_close, np64, rand, run_in_fresh_thread, tolerance

QNAMES = ["int8", "fp8_e4m3", "fp8_e5m2"]
QMAX = {"int8": 127, "fp8_e4m3": 448, "fp8_e5m2": 57344}
MANT_EMIN = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}
GRANULARITIES = ["row", "column", "tensor"]
GPU = torch.cuda.is_available()


def qvalues(q: torch.Tensor) -> np.ndarray:
    """Exact float64 values of a quantized tensor."""
    return quantized_to_numpy(q).astype(np.float64)


def assert_quantized_equal(q, scale, x, qname, granularity):
    """q and scale equal the reference quantization of x (2-D view) exactly."""
    x2 = np64(x.reshape(-1, x.shape[-1]))
    rq, rs = ref.quantize_ref(x2, qname, granularity)
    np.testing.assert_array_equal(qvalues(q).reshape(x2.shape), rq.astype(np.float64))
    np.testing.assert_array_equal(scale.cpu().numpy().reshape(rs.shape), rs)


def random_q(shape, qname, device, granularity="row"):
    """A random quantized tensor (through the torch quantizer) and its scale."""
    return tritonlab.quantize(rand(*shape, device=device), qname, granularity, backend="torch")


# ----------------------------------------------------------------------------- quantize

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("qname", QNAMES)
def test_quantize_matches_reference_exactly(backend, device, qname, granularity, dtype):
    for shape in [(1, 45), (37, 45), (2, 3, 70), (45,)]:
        x = rand(*shape, dtype=dtype, device=device, scale=3.0)
        q, scale = tritonlab.quantize(x, qname, granularity, backend=backend)
        assert q.shape == x.shape and q.dtype == ops.QDTYPE[qname] and scale.dtype == torch.float32
        rank = x.dim()
        expected_scale_shape = {"row": shape[:-1] + (1,), "column": (1,) * (rank - 1) + shape[-1:], "tensor": ()}
        assert tuple(scale.shape) == expected_scale_shape[granularity]
        assert_quantized_equal(q, scale, x, qname, granularity)


def quantization_bound(xv: np.ndarray, s: np.ndarray, qname: str, slack: float = 2.0**-16) -> np.ndarray:
    """Largest |x - q * scale| the rule allows: half a step for int8, half an fp8 ulp of x / scale
    (relative in the normal range, absolute below it); `slack` covers float32 rounding of x / scale."""
    if qname == "int8":
        return s * (0.5 + slack)
    mant, emin = MANT_EMIN[qname]
    return np.maximum(np.abs(xv) * 2.0 ** -(mant + 1), s * 2.0 ** (emin - mant - 1)) * (1 + slack)


@pytest.mark.parametrize("qname", QNAMES)
def test_quantize_error_within_the_quantization_bound(backend, device, qname):
    x = rand(53, 77, device=device, scale=2.0)
    q, scale = tritonlab.quantize(x, qname, "row", backend=backend)
    xv, deq, s = np64(x), qvalues(q) * np64(scale), np64(scale)
    err = np.abs(xv - deq)
    bound = quantization_bound(xv, s, qname)
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3e}"
    floor = {"int8": 38.0, "fp8_e4m3": 29.0, "fp8_e5m2": 23.0}[qname]  # Gaussian data, per-row scales
    assert ref.sqnr_db(deq, xv) > floor


def test_quantize_every_config_is_exact(device):
    """The tunable configs (one- and two-pass rows, column and tensor blocks) never change a value."""
    kernel = registered()["quantize"]
    cases = [({"M": 37, "N": 100, "G": 0}, {"BLOCK_M": 4, "BLOCK_N": 32, "num_warps": 1}),  # two passes
             ({"M": 37, "N": 100, "G": 0}, {"BLOCK_M": 8, "BLOCK_N": 128, "num_warps": 2}),
             ({"M": 37, "N": 100, "G": 1}, {"BLOCK_M": 8, "BLOCK_N": 32, "num_warps": 2}),
             ({"M": 37, "N": 100, "G": 2}, {"BLOCK": 512, "num_warps": 4})]
    for shape, config in cases:
        inp = kernel.make_inputs(shape, torch.float32, device)
        inp["x"] = rand(shape["M"], shape["N"], device=device, scale=5.0)  # fresh draw
        assert kernel.error(inp, kernel.run(inp, config)) == 0.0
    assert kernel.space({"M": 4096, "N": 14336, "G": 0}) and kernel.presets["models"]


@pytest.mark.parametrize("qname", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_negative_values_that_round_to_zero_keep_their_sign(backend, device, qname):
    """-tiny quantizes to -0 (0x80), as the fp8 cast and ml_dtypes give, not +0."""
    x = rand(5, 37, device=device)
    x[:, 0] = 1e4  # a large amax, so the tiny entries below round to zero on the fp8 grid
    x[:, 1:9] = -torch.rand(5, 8, device=device) * 1e-9
    q, scale = tritonlab.quantize(x, qname, "row", backend=backend)
    rq, _ = ref.quantize_ref(np64(x), qname, "row")
    got = qvalues(q)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(rq.astype(np.float64)))
    assert np.signbit(got[:, 1:9]).all() and (got[:, 1:9] == 0).all()


def test_quantize_row_spans_blocks_and_odd_rows(backend, device):
    x = rand(3, 1000, device=device, dtype=torch.bfloat16, scale=4.0)
    for qname in QNAMES:
        q, scale = tritonlab.quantize(x, qname, "row", backend=backend)
        assert_quantized_equal(q, scale, x, qname, "row")


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_non_finite_values_spoil_only_their_own_row(backend, device):
    x = rand(9, 40, device=device)
    x[2, 7] = float("nan")
    x[5, 0] = float("inf")
    x[6, 3] = float("-inf")
    clean = [i for i in range(9) if i not in (2, 5, 6)]
    for qname in QNAMES:
        q, scale = tritonlab.quantize(x, qname, "row", backend=backend)
        q_clean, s_clean = tritonlab.quantize(x[clean], qname, "row", backend=backend)
        np.testing.assert_array_equal(qvalues(q)[clean], qvalues(q_clean))
        np.testing.assert_array_equal(scale.cpu().numpy()[clean], s_clean.cpu().numpy())
        assert math.isnan(scale[2, 0].item()) and scale[5, 0].item() == math.inf and scale[6, 0].item() == math.inf
        assert np.all(qvalues(q)[[2, 5, 6]] == 0)  # q * scale is NaN on the spoiled rows
        with np.errstate(invalid="ignore"):
            assert np.all(np.isnan(qvalues(q)[[2, 5, 6]] * scale.cpu().numpy()[[2, 5, 6]]))
        assert_quantized_equal(q, scale, x, qname, "row")
        with pytest.raises(ValueError, match="x"):
            tritonlab.quantize(x, qname, "row", check_finite=True, backend=backend)


def test_nan_row_stays_in_its_row_through_the_gemm(backend, device):
    x, w = rand(6, 40, device=device), rand(24, 40, device=device)
    x[4, 11] = float("nan")
    for qname in QNAMES:
        a_q, a_s = tritonlab.quantize(x, qname, "row", backend=backend)
        b_q, b_s = tritonlab.quantize(w, qname, "row", backend=backend)
        for act in (None, "relu"):  # relu keeps NaN, as torch.relu does
            y = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, activation=act, out_dtype=torch.float32, backend=backend)
            assert torch.isnan(y[4]).all() and torch.isfinite(y[[0, 1, 2, 3, 5]]).all()


def test_quantize_zero_slices_saturation_and_empty(backend, device):
    x = rand(6, 33, device=device, scale=1e4)
    x[1] = 0.0
    x[3, 4] = 3e38  # finite, far above every qmax: q saturates, never inf or NaN
    for qname in QNAMES:
        q, scale = tritonlab.quantize(x, qname, "row", backend=backend)
        assert scale[1, 0].item() == 1.0 and np.all(qvalues(q)[1] == 0)
        assert np.all(np.isfinite(qvalues(q))) and np.abs(qvalues(q)).max() <= QMAX[qname]
        assert qvalues(q)[3, 4] == QMAX[qname]
        assert_quantized_equal(q, scale, x, qname, "row")
        for g in GRANULARITIES:
            q, scale = tritonlab.quantize(x, qname, g, backend=backend)
            assert_quantized_equal(q, scale, x, qname, g)
        for shape, g, s_shape in [((0, 33), "row", (0, 1)), ((0, 33), "column", (1, 33)), ((4, 0), "row", (4, 1)),
                                  ((2, 0, 5), "tensor", ())]:
            q, scale = tritonlab.quantize(rand(*shape, device=device), qname, g, backend=backend)
            assert q.shape == shape and tuple(scale.shape) == s_shape and torch.all(scale == 1)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_quantize_tiny_slices_keep_their_values(backend, device, granularity):
    """A slice whose amax / qmax is below the smallest normal float32 gets the floor scale 2**-126
    (1 / scale stays finite): q * scale stays within half a step of x, where a subnormal scale made
    every q saturate. Values from 2.5e-38 to 2e-36, all normal floats."""
    for qname in QNAMES:
        x = torch.tensor([[1e-37, 5e-38, 2.5e-38, -3.3e-38], [7e-37, -2e-36, 1e-36, 0.0]], device=device)
        x = x * (QMAX[qname] / 127) if granularity == "row" else x
        q, scale = tritonlab.quantize(x, qname, granularity, backend=backend)
        assert_quantized_equal(q, scale, x, qname, granularity)
        s64 = scale.cpu().numpy().astype(np.float64)
        deq = qvalues(q) * s64
        # half a step: scale / 2 on the int8 grid; on the fp8 grids a relative half ulp (at most 2**-3)
        # plus half the subnormal spacing (at most 2**-10 * scale)
        half = s64 / 2 if qname == "int8" else np.abs(np64(x)) * 2.0**-3 + s64 * 2.0**-10
        assert np.all(np.abs(deq - np64(x)) <= half), (qname, deq, np64(x))


def test_quantize_works_after_a_call_under_inference_mode():
    """The CPU quantizer's reused scratch buffer, first made under torch.inference_mode(), must stay
    writable by later calls outside it (a fresh thread gets fresh buffers)."""
    def run():
        with torch.inference_mode():
            tritonlab.quantize(rand(5, 7), "int8", backend="torch")
        x = rand(5, 7)
        q, scale = tritonlab.quantize(x, "int8", backend="torch")
        assert_quantized_equal(q, scale, x, "int8", "row")

    run_in_fresh_thread(run)


def test_quantize_accepts_torch_dtypes(device):
    x = rand(5, 16, device=device)
    for dtype, name in [(torch.int8, "int8"), (torch.float8_e4m3fn, "fp8_e4m3"), (torch.float8_e5m2, "fp8_e5m2")]:
        q1, s1 = tritonlab.quantize(x, dtype, backend="torch")
        q2, s2 = tritonlab.quantize(x, name, backend="torch")
        assert q1.dtype == dtype and torch.equal(q1.float(), q2.float()) and torch.equal(s1, s2)


# ----------------------------------------------------------------------------- scaled_matmul

PAIRS = [("int8", "int8"), ("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2")]
MM_CASES = [  # M, N, K, activation, out_dtype, a_scale form, b_scale form
    (1, 29, 45, None, torch.float32, "col", "row_n1"),
    (37, 29, 45, "relu", torch.bfloat16, "vec", "vec"),
    (70, 33, 130, "gelu", torch.float16, "scalar", "row_1n"),
    (20, 64, 64, "silu", torch.float32, "col", "scalar"),
]


def _scale_form(s: torch.Tensor, form: str) -> torch.Tensor:
    """Reshape a per-row/per-channel scale (or reduce it to one scale) into the accepted forms."""
    flat = s.reshape(-1)
    return {"col": flat[:, None], "vec": flat, "row_n1": flat[:, None], "row_1n": flat[None, :],
            "scalar": flat.max()}[form]


def _mm_tolerance(qname: str, out_dtype: torch.dtype, backend: str) -> float:
    tol = tolerance(out_dtype)
    if qname != "int8" and GPU and backend == "triton":
        tol = max(tol, 2e-3)  # Hopper's fp8 tensor cores accumulate in reduced precision
    return tol


@pytest.mark.parametrize("case", MM_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{str(c[4])[6:]}")
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_scaled_matmul_matches_reference(backend, device, pair, case):
    m, n, k, act, out_dtype, a_form, b_form = case
    a_q, a_s = random_q((m, k), pair[0], device)
    b_q, b_s = random_q((n, k), pair[1], device)
    a_s, b_s = _scale_form(a_s, a_form), _scale_form(b_s, b_form)
    bias = rand(n, device=device, dtype=torch.bfloat16)
    y = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, act, out_dtype, backend=backend)
    assert y.shape == (m, n) and y.dtype == out_dtype
    expected = ref.scaled_matmul_ref(quantized_to_numpy(a_q), np64(a_s), quantized_to_numpy(b_q), np64(b_s),
                                     np64(bias), act)
    assert_close(y, expected, _mm_tolerance(pair[0], out_dtype, backend))


@pytest.mark.parametrize("m,n,k", [(19, 23, 300), (19, 23, 1100), (3, 5, 5000)])
def test_int8_gemm_is_exact_before_scaling(backend, device, m, n, k):
    """Full-range int8 operands; sums past 2**24 (K = 1100, 5000) round only in the final int32 ->
    float32 conversion, which is round-to-nearest-even in every path."""
    a_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
    b_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    one = torch.ones((), device=device)
    y = tritonlab.scaled_matmul(a_q, one, b_q, one, out_dtype=torch.float32, backend=backend)
    exact = ref.int8_matmul_ref(a_q.cpu().numpy(), b_q.cpu().numpy())
    np.testing.assert_array_equal(y.cpu().numpy(), exact.astype(np.float32))
    if k * 127 * 127 < 2**24:
        np.testing.assert_array_equal(y.cpu().numpy().astype(np.int64), exact)


# the interpreter's numpy warnings on the float16 overflow row
@pytest.mark.filterwarnings("ignore:overflow encountered in cast", "ignore:invalid value encountered in multiply")
@pytest.mark.parametrize("n", [50, 300], ids=["fused", "unfused"])  # one tile spans N = 50 rows; 300 does not
@pytest.mark.parametrize("qname", QNAMES)
def test_scaled_matmul_quantize_output(backend, device, qname, n):
    """The next layer's per-token quantization, fused into the epilogue when a tile spans the row."""
    m, k = 37, 45
    a_q, a_s = random_q((m, k), qname, device)
    b_q, b_s = random_q((n, k), qname, device)
    bias = rand(n, device=device)
    q, scale = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, "gelu", torch.float32, quantize_output=qname,
                                       backend=backend)
    assert q.shape == (m, n) and q.dtype == ops.QDTYPE[qname] and scale.shape == (m, 1)
    y_ref = ref.scaled_matmul_ref(quantized_to_numpy(a_q), np64(a_s), quantized_to_numpy(b_q), np64(b_s),
                                  np64(bias), "gelu")
    err = np.abs(y_ref - qvalues(q) * np64(scale))
    # the rule's bound around the float32 epilogue value, which is within ~1e-6 of the reference
    # (within the reduced-precision fp8 accumulation of Hopper's tensor cores on a GPU)
    acc_err = 2e-3 if (qname != "int8" and GPU and backend == "triton") else 1e-6
    bound = quantization_bound(y_ref, np64(scale), qname, slack=1e-3) + acc_err * np.abs(y_ref).max()
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3e}"
    if qname == "int8":
        # exact accumulators: q equals quantize() of the result rounded to out_dtype (torch's rounding
        # of the same float32 epilogue values), an out_dtype overflow included (all-100 operands:
        # y ~ 4e5 is inf in float16, so that row's scale is inf and its q zero)
        big = torch.full((1, k), 100, dtype=torch.int8, device=device)
        a_q, a_s = torch.cat([a_q, big]), torch.cat([a_s, torch.ones_like(a_s[:1])])
        b_q, b_s = torch.cat([b_q[:-1], big]), torch.cat([b_s[:-1], torch.ones_like(b_s[:1])])
        y = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, "gelu", torch.float32, backend=backend)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            q, scale = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, "gelu", out_dtype, quantize_output=qname,
                                               backend=backend)
            q2, scale2 = tritonlab.quantize(y.to(out_dtype), qname, "row", backend=backend)
            assert torch.equal(q, q2) and torch.equal(scale, scale2), out_dtype
        assert not torch.isfinite(scale[-1]) and torch.all(q[-1] == 0)  # float16: the overflow row
    q_e, s_e = tritonlab.scaled_matmul(a_q[:0], a_s[:0], b_q, b_s, quantize_output=qname, backend=backend)
    assert q_e.shape == (0, n) and s_e.shape == (0, 1)


def test_scaled_matmul_every_config_matches(device):
    kernel = registered()["scaled_matmul"]
    shape = kernel.presets["small"][0]
    for config in [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 2},
                   kernel.space(shape)[0], kernel.default(shape)]:
        for dtype in kernel.dtypes:
            if dtype != torch.int8 and not ops.fp8_supported(torch.device(device)):
                continue
            inp = kernel.make_inputs(shape, dtype, device)
            assert kernel.error(inp, kernel.run(inp, config)) <= kernel.tolerance(dtype)
    assert {"M": 8192, "N": 8192, "K": 8192} in kernel.presets["models"]


def test_scaled_matmul_empty(backend, device):
    for m, n, k in [(0, 7, 16), (5, 0, 16), (4, 6, 0)]:
        a_q, a_s = random_q((m, k), "int8", device)
        b_q, b_s = random_q((n, k), "int8", device)
        bias = rand(n, device=device)
        y = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, out_dtype=torch.float32, backend=backend)
        assert y.shape == (m, n)
        if m and n:  # K = 0: the empty sum, then the bias
            assert_close(y, np.broadcast_to(np64(bias), (m, n)), tolerance(torch.float32))


def test_paths_are_reported(device):
    x = rand(40, 32, device=device)
    for qname in QNAMES:
        a_q, a_s = tritonlab.quantize(x, qname, backend="torch")
        assert tritonlab.kernels.quantized.scaled_matmul_path(a_q, a_q, backend="torch") in (
            "torch-int8-exact", "torch-int_mm", "torch-fp8-upcast")
        path = tritonlab.kernels.quantized.scaled_matmul_path(a_q, a_q, backend="triton")
        if qname == "int8":
            assert path in (("triton",) if ops.int8_gemm_supported(torch.device(device))
                            else ("torch-int_mm", "torch-int8-exact"))
        else:
            assert path == ("triton" if ops.fp8_supported(torch.device(device)) else "torch-fp8-upcast")
        expected = "triton" if qname == "int8" or ops.fp8_supported(torch.device(device)) else "torch"
        assert tritonlab.kernels.quantized.quantize_path(x, qname, backend="triton") == expected
    if device.type == "cpu":
        a_q, _ = tritonlab.quantize(x, "int8", backend="torch")
        assert tritonlab.kernels.quantized.scaled_matmul_path(a_q, a_q, backend="auto") == "torch-int8-exact"


@pytest.mark.parametrize("arch, int8_gemm, fp8", [(75, False, False), (80, True, False), (89, True, True), (90, True, True)])
def test_paths_follow_the_hardware(monkeypatch, arch, int8_gemm, fp8):
    """Answered for a compile target: Triton cannot lower an int8 dot below sm_80 (every config
    fails to compile for sm_75), so the int8 GEMM takes a torch path there; the int8 quantize has no
    dot and stays; fp8 needs sm_89."""
    monkeypatch.setattr(_backend, "_compile_target", _backend.CompileTarget(arch=arch, shared_memory=64 * 1024))
    x = torch.randn(8, 32)
    cpu = torch.device("cpu")
    assert ops.int8_gemm_supported(cpu) == int8_gemm and ops.fp8_supported(cpu) == fp8
    for qname in QNAMES:
        a_q, _ = ops.fallback.quantize_torch(x, qname, "row")
        runs = int8_gemm if qname == "int8" else fp8
        path = ops.scaled_matmul_path(a_q, a_q, backend="triton")
        assert (path == "triton") == runs, (qname, path)
        assert ops.quantize_path(x, qname, backend="triton") == ("triton" if qname == "int8" or fp8 else "torch")
    inputs = registered()["scaled_matmul"].make_inputs
    if not int8_gemm:
        with pytest.raises(NotApplicable, match="8.0"):
            inputs({"M": 16, "N": 16, "K": 16}, torch.int8, cpu)


# ----------------------------------------------------------------------------- QuantizedFFN

def _linears(d, h, o, dtype, device, bias=True):
    l1, l2 = nn.Linear(d, h, bias=bias), nn.Linear(h, o, bias=bias)
    with torch.no_grad():  # biases of a trained layer's size, not the init's tiny ones
        for lin in (l1, l2):
            if bias:
                lin.bias.normal_(0.0, 0.3)
    return l1.to(device=device, dtype=dtype), l2.to(device=device, dtype=dtype)


SQNR_FLOOR = {"int8": 33.0, "fp8_e4m3": 22.0, "fp8_e5m2": 16.0}


def one_hidden_flip(x, w1, b1, w2, qname, activation) -> np.ndarray:
    """[T]: the largest change one token's output can take when one hidden value rounds to its
    neighbour instead (||w2 column j|| * hidden scale * the spacing of the format at that value).

    The kernels and the NumPy pipeline quantize the same inputs and weights bit for bit, but they
    form the hidden layer in float32 and float64: a hidden value within rounding of a quantization
    boundary can land on either side. One such flip at T = 1, H = 300 costs about 14 dB of the
    SQNR against the pipeline, so a fixed dB margin would fail on rare draws."""
    w1_q, w1_s = ref.quantize_ref(w1, qname, "row")
    w2_q, w2_s = ref.quantize_ref(w2, qname, "row")
    x_q, x_s = ref.quantize_ref(x, qname, "row")
    h_q, h_s = ref.quantize_ref(ref.scaled_matmul_ref(x_q, x_s, w1_q, w1_s, b1, activation), qname, "row")
    hv = np.abs(h_q.astype(np.float64))
    if qname == "int8":
        spacing = np.ones_like(hv)
    else:  # the gap above |v| (the wider one at a power of two), subnormals spaced as the smallest normals
        mant, emin = MANT_EMIN[qname]
        spacing = np.exp2(np.floor(np.log2(np.maximum(hv, 2.0**emin))) - mant)
    w2_cols = np.linalg.norm(ref.dequantize_ref(w2_q, w2_s), axis=0)  # [H]
    return h_s[:, 0] * np.max(spacing * w2_cols[None, :], axis=1)


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("qname", QNAMES)
def test_quantized_ffn_error_is_the_quantization_error(backend, device, qname, activation):
    d, h, o = 72, (300 if activation == "silu" else 100), 40  # H <= 256: fused hidden quantization
    l1, l2 = _linears(d, h, o, torch.float32, device)
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, activation, qname, backend=backend)
    w = [np64(t) for t in (l1.weight, l1.bias, l2.weight, l2.bias)]
    # Hidden values that round to the other neighbour, per token: float32 vs float64 makes them rare
    # (none in 400 draws of this test); on a GPU, fp8 tensor-core sums round differently and flip more.
    flips = 6 if (qname != "int8" and GPU and backend == "triton") else 2
    for t in (1, 37):
        x = rand(t, d, device=device)
        y = ffn(x)
        assert y.shape == (t, o) and y.dtype == torch.float32
        exact = ref.ffn_ref(np64(x), *w, activation)
        simulated = ref.quantized_ffn_ref(np64(x), *w, activation, qname)
        sqnr = ref.sqnr_db(np64(y), exact)
        print(f"{qname} {activation} T={t}: SQNR {sqnr:.1f} dB (NumPy pipeline {ref.sqnr_db(simulated, exact):.1f} dB)")
        assert sqnr > SQNR_FLOOR[qname]
        # The kernels compute the same quantized arithmetic: each token's output is the pipeline's
        # up to a few flipped hidden roundings (and float32 rounding of the output itself).
        off = np.linalg.norm(np64(y) - simulated, axis=1)
        bound = flips * one_hidden_flip(np64(x), w[0], w[1], w[2], qname, activation)
        bound += 1e-5 * np.linalg.norm(simulated, axis=1)
        assert np.all(off <= bound), (off / bound).max()
        if t > 1:  # most tokens see no flip: far below the quantization error itself
            noise = np.linalg.norm(exact - simulated, axis=1)
            assert np.median(off / noise) < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_ffn_half_precision_and_leading_dims(backend, device, dtype):
    d, h, o = 48, 80, 24
    l1, l2 = _linears(d, h, o, dtype, device, bias=False)
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, nn.GELU(), "int8", backend=backend)
    x = rand(2, 5, d, dtype=dtype, device=device)
    y = ffn(x)
    assert y.shape == (2, 5, o) and y.dtype == dtype
    exact = ref.ffn_ref(np64(x.reshape(10, d)), np64(l1.weight), None, np64(l2.weight), None, "gelu")
    assert ref.sqnr_db(np64(y.reshape(10, o)), exact) > 30.0  # int8 noise plus bf16 hidden/output rounding
    assert ffn(rand(0, d, dtype=dtype, device=device)).shape == (0, o)
    assert ffn(rand(3, 0, d, dtype=dtype, device=device)).shape == (3, 0, o)


@pytest.mark.parametrize("qname", QNAMES)
def test_quantized_ffn_survives_module_wide_casts(device, qname):
    """model.half() / .to(bfloat16) / .double() leave the quantized state as it is (fp8 values count as
    floating point and were cast, which the GEMM then refused): same outputs before and after."""
    l1, l2 = _linears(24, 40, 16, torch.float32, device, bias=True)
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, "gelu", qname, backend="torch")
    x = rand(3, 24, device=device)
    before = {dt: ffn(x.to(dt)) for dt in (torch.float16, torch.bfloat16, torch.float32)}
    state = {name: b.clone() for name, b in ffn.named_buffers()}
    for cast, dt in ((lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                     (lambda m: m.double(), torch.float32)):
        ffn = cast(ffn)
        for name, b in ffn.named_buffers():
            assert b.dtype == state[name].dtype and torch.equal(b.view(torch.uint8), state[name].view(torch.uint8))
        assert torch.equal(ffn(x.to(dt)), before[dt])


def test_quantized_ffn_weight_memory_and_repr(device):
    l1, l2 = _linears(256, 512, 256, torch.float32, device)
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "fp8_e4m3")
    mem = ffn.weight_memory()
    n_weights = 2 * 256 * 512
    assert mem["float_bytes"] == 4 * (n_weights + 512 + 256)
    assert mem["quantized_bytes"] == n_weights + 4 * (512 + 256) * 2  # values, fp32 scales, fp32 biases
    assert 0.25 < mem["ratio"] < 0.27
    assert "fp8_e4m3" in repr(ffn) and ffn.gemm_path() in ("triton", "torch-fp8-upcast")
    half = tritonlab.QuantizedFFN.from_float(*_linears(256, 512, 256, torch.bfloat16, device), "relu", "int8")
    assert 0.5 < half.weight_memory()["ratio"] < 0.55


# ----------------------------------------------------------------------------- bad inputs, compile

def _bad_calls():
    a_q, a_s = random_q((5, 16), "int8", "cpu")
    b_q, b_s = random_q((7, 16), "int8", "cpu")
    f8, f8_s = random_q((7, 16), "fp8_e4m3", "cpu")
    mm = tritonlab.scaled_matmul
    l1, l2 = nn.Linear(16, 8), nn.Linear(8, 4)
    return [
        ("dtype", ValueError, lambda: tritonlab.quantize(rand(3, 4), "int4")),
        ("dtype", ValueError, lambda: tritonlab.quantize(rand(3, 4), torch.float16)),
        ("granularity", ValueError, lambda: tritonlab.quantize(rand(3, 4), "int8", "block")),
        ("x", TypeError, lambda: tritonlab.quantize(torch.ones(3, 4, dtype=torch.int32), "int8")),
        ("x", ValueError, lambda: tritonlab.quantize(rand(1).reshape(()), "int8")),
        ("backend", ValueError, lambda: tritonlab.quantize(rand(3, 4), "int8", backend="cuda")),
        ("a_q", TypeError, lambda: mm(rand(5, 16), a_s, b_q, b_s)),
        ("b_q", TypeError, lambda: mm(a_q, a_s, b_q.to(torch.int32), b_s)),
        ("b_q", TypeError, lambda: mm(a_q, a_s, f8, f8_s)),
        ("a_q", ValueError, lambda: mm(a_q[None], a_s, b_q, b_s)),
        ("b_q", ValueError, lambda: mm(a_q, a_s, b_q[:, :15], b_s)),
        ("a_scale", ValueError, lambda: mm(a_q, a_s[:4], b_q, b_s)),
        ("a_scale", ValueError, lambda: mm(a_q, a_s.reshape(1, 5), b_q, b_s)),
        ("a_scale", TypeError, lambda: mm(a_q, a_s.to(torch.int32), b_q, b_s)),
        ("b_scale", ValueError, lambda: mm(a_q, a_s, b_q, b_s[:6])),
        ("b_scale", ValueError, lambda: mm(a_q, a_s, b_q, torch.ones(7, 2))),
        ("bias", ValueError, lambda: mm(a_q, a_s, b_q, b_s, rand(6))),
        ("activation", ValueError, lambda: mm(a_q, a_s, b_q, b_s, activation="tanh")),
        ("out_dtype", TypeError, lambda: mm(a_q, a_s, b_q, b_s, out_dtype=torch.int8)),
        ("quantize_output", ValueError, lambda: mm(a_q, a_s, b_q, b_s, quantize_output="int4")),
        ("b_scale", ValueError, lambda: mm(a_q, a_s, b_q, b_s.to("meta"))),
        ("linear1", TypeError, lambda: tritonlab.QuantizedFFN.from_float(nn.Identity(), l2, "relu", "int8")),
        ("linear2", ValueError, lambda: tritonlab.QuantizedFFN.from_float(l1, nn.Linear(9, 4), "relu", "int8")),
        ("dtype", ValueError, lambda: tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "int4")),
        ("activation", ValueError, lambda: tritonlab.QuantizedFFN.from_float(l1, l2, "tanh", "int8")),
        ("activation", ValueError, lambda: tritonlab.QuantizedFFN.from_float(l1, l2, nn.Tanh(), "int8")),
        ("x", ValueError, lambda: tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "int8")(rand(3, 15))),
        ("x", TypeError, lambda: tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "int8")([[0.0] * 16])),
        ("w1_q", ValueError, lambda: tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "int8")(rand(3, 16, device="meta"))),
        ("linear1.weight", ValueError, lambda: tritonlab.QuantizedFFN.from_float(_with_nan(l1), l2, "relu", "int8")),
        ("linear2.weight", TypeError, lambda: tritonlab.QuantizedFFN.from_float(l1, nn.Linear(8, 4).double(), "relu", "int8")),
        ("w1_q", TypeError, lambda: tritonlab.QuantizedFFN(rand(8, 16), a_s[:1].expand(8, 1), None, b_q[:4, :8], b_s[:4], None, "relu", "int8")),
        ("w1_q", ValueError, lambda: tritonlab.QuantizedFFN(b_q[0], b_s, None, b_q, b_s, None, "relu", "int8")),
        ("w1_scale", ValueError, lambda: tritonlab.QuantizedFFN(b_q, b_s[:3], None, b_q[:, :7], b_s, None, "relu", "int8")),
        ("b1", ValueError, lambda: tritonlab.QuantizedFFN(b_q, b_s, rand(3), b_q[:, :7], b_s, None, "relu", "int8")),
        ("backend", ValueError, lambda: tritonlab.QuantizedFFN(b_q, b_s, None, b_q[:, :7], b_s, None, "relu", "int8", backend="gpu")),
    ]


def _with_nan(linear: nn.Linear) -> nn.Linear:
    bad = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        bad.weight.copy_(linear.weight)
        bad.weight[0, 0] = float("nan")
    return bad


@pytest.mark.parametrize("name,exc,call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_clear_errors(name, exc, call):
    with pytest.raises(exc, match=name):
        call()


def test_ops_hold_in_a_compiled_graph(device):
    l1, l2 = _linears(32, 48, 16, torch.float32, device)
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, "gelu", "int8", backend="torch")
    w_q, w_s = tritonlab.quantize(rand(24, 32, device=device), "fp8_e4m3", backend="torch")

    def layer(x):
        x_q, x_s = tritonlab.quantize(x, "fp8_e4m3", backend="torch")
        return ffn(x), tritonlab.scaled_matmul(x_q, x_s, w_q, w_s, out_dtype=torch.float32, backend="torch")

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = rand(9, 32, device=device)
    for got, want in zip(compiled(x), layer(x)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("qname", QNAMES)
def test_gpu_quantize_large_exact_and_no_sync(qname):
    for shape in [(512, 4096), (3, 20000), (4096, 14336)]:  # one pass, two passes, the FFN's hidden layer
        x = rand(*shape, dtype=torch.bfloat16, device="cuda", scale=3.0)
        for g in GRANULARITIES:
            q, scale = tritonlab.quantize(x, qname, g, backend="triton")
            q_t, scale_t = tritonlab.quantize(x, qname, g, backend="torch")
            assert torch.equal(q.view(torch.uint8), q_t.view(torch.uint8)) and torch.equal(scale, scale_t)
            if shape[0] * shape[1] <= 2**21:
                assert_quantized_equal(q, scale, x, qname, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync in the tensor-granularity path would raise
    try:
        tritonlab.quantize(x, qname, "tensor", backend="triton")
        tritonlab.quantize(x, qname, "row", backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_int8_gemm_large_exact():
    m, n, k = 1024, 2048, 4096
    a_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    one = torch.ones((), device="cuda")
    y = tritonlab.scaled_matmul(a_q, one, b_q, one, out_dtype=torch.float32, backend="triton")
    exact = torch._int_mm(a_q, b_q.t())
    assert torch.equal(y, exact.float())


@pytest.mark.gpu
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_gpu_scaled_matmul_large_vs_torch(pair):
    if pair[0] != "int8" and not ops.fp8_supported(torch.device("cuda")):
        pytest.skip("no FP8 on this GPU")
    m, n, k = 1000, 1536, 2048
    a_q, a_s = random_q((m, k), pair[0], "cuda")
    b_q, b_s = random_q((n, k), pair[1], "cuda")
    bias = rand(n, device="cuda")
    y = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, "gelu", torch.bfloat16, backend="triton")
    y_t = tritonlab.scaled_matmul(a_q, a_s, b_q, b_s, bias, "gelu", torch.float32, backend="torch")
    assert_close(y, y_t.cpu().double().numpy(), 1e-2)
