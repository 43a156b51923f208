"""Property-based checks (hypothesis): every op against its float64 NumPy reference on shapes that
hypothesis draws and shrinks (T = 0 and 1, widths of 1, one group, all slots in one group, k up to
4, prime and tiny sequence lengths), values from a drawn seed. A failure prints the smallest
shape hypothesis found and the seed that reproduces it.

The torch fallbacks run many examples (native speed); the Triton kernels, under the interpreter
on a machine without a GPU, run a few of the cheaper ops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tritonlab  # noqa: E402
from tritonlab.kernels._triton import HAS_TRITON  # noqa: E402
from tritonlab.kernels.fft_mixing import reference as fft_ref  # noqa: E402
from tritonlab.kernels.grouped_gemm import reference as gg_ref  # noqa: E402
from tritonlab.kernels.tree_routing import reference as tree_ref  # noqa: E402

from helpers import assert_close, np64, tolerance  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
#: the stated float32 bound (kernels/_accuracy.py): every op here computes in float32
TOL = tolerance(torch.float32)


def _settings(examples: int):
    # no example database (nothing written into the checkout); shapes only, so no deadline
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE)


seeds = st.integers(0, 2**31 - 1)
backends = ["torch"] + (["triton"] if HAS_TRITON else [])


def _examples(backend: str, on_torch: int, on_triton: int) -> int:
    # the Triton kernels: few examples under the interpreter, and on a GPU each new shape may compile
    return on_torch if backend == "torch" else on_triton * (3 if GPU else 1)


# ----------------------------------------------------------------------------- tree routing

def _tree_case(backend, t, d, depth, seed):
    gen = torch.Generator().manual_seed(seed)
    x, nw, nb = _randn(gen, t, d), _randn(gen, 2**depth - 1, d), _randn(gen, 2**depth - 1)
    got = tritonlab.tree_route(x, nw, nb, backend=backend)
    assert got.shape == (t,) and got.dtype == torch.int32
    if t == 0:
        return
    ref = tree_ref.tree_route_ref(np64(x), np64(nw), np64(nb))
    clear = tree_ref.route_margin_ref(np64(x), np64(nw), np64(nb)) > 1e-5  # near-ties may go either way
    assert np.array_equal(got.cpu().numpy()[clear], ref[clear])


@pytest.mark.parametrize("backend", backends)
def test_tree_route_matches_the_reference(backend):
    @_settings(_examples(backend, 150, 8))
    @given(t=st.integers(0, 70), d=st.integers(1, 40), depth=st.integers(0, 7), seed=seeds)
    def check(t, d, depth, seed):
        _tree_case(backend, t, d, depth, seed)

    check()


@pytest.mark.parametrize("backend", backends)
def test_fff_forward_matches_the_reference(backend):
    @_settings(_examples(backend, 100, 5))
    @given(t=st.integers(0, 40), d=st.integers(1, 24), h=st.integers(1, 20), o=st.integers(1, 24),
           depth=st.integers(0, 5), act=st.sampled_from(["relu", "gelu", "silu", "gelu_tanh", None]),
           bias=st.booleans(), seed=seeds)
    def check(t, d, h, o, depth, act, bias, seed):
        gen = torch.Generator().manual_seed(seed)
        n, leaves = 2**depth - 1, 2**depth
        nw, nb = _randn(gen, n, d), _randn(gen, n) if bias else None
        w1, w2 = _randn(gen, leaves, d, h), _randn(gen, leaves, h, o)
        b1, b2 = (_randn(gen, leaves, h), _randn(gen, leaves, o)) if bias else (None, None)
        x = _randn(gen, t, d)
        y = tritonlab.fff_forward(x, nw, nb, w1, b1, w2, b2, act, backend=backend)
        assert y.shape == (t, o)
        if t == 0:
            return
        # tokens whose route is a near-tie may take either leaf: compare the others
        clear = tree_ref.route_margin_ref(np64(x), np64(nw), np64(nb)) > 1e-5
        ref = tree_ref.fff_forward_ref(np64(x), np64(nw), np64(nb), np64(w1), np64(b1), np64(w2), np64(b2), act)
        if clear.any():
            assert_close(y[torch.from_numpy(clear).to(y.device)], ref[clear], TOL)

    check()


# ----------------------------------------------------------------------------- grouped GEMMs

@st.composite
def _grouping(draw):
    """(T, k, G, indices rule): uniform ids, or every slot in one group, or ids from a few groups."""
    t, k, g = draw(st.integers(0, 60)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    return t, k, g, draw(st.sampled_from(["uniform", "one", "few"]))


def _indices(gen, t, k, g, rule):
    if rule == "one":
        return torch.full((t, k), int(torch.randint(g, (), generator=gen)), dtype=torch.int64).to(DEVICE)
    hi = g if rule == "uniform" else min(g, 2)
    return torch.randint(hi, (t, k), generator=gen).to(DEVICE)


@pytest.mark.parametrize("backend", backends)
def test_gather_matmul_scatter_matches_the_reference(backend):
    @_settings(_examples(backend, 120, 6))
    @given(grouping=_grouping(), d=st.integers(1, 40), n=st.integers(1, 40), bias=st.booleans(), rw=st.booleans(),
           act=st.sampled_from(["relu", "gelu", "silu", "gelu_tanh", None]), seed=seeds)
    def check(grouping, d, n, bias, rw, act, seed):
        t, k, g, rule = grouping
        gen = torch.Generator().manual_seed(seed)
        x, w = _randn(gen, t, d), _randn(gen, g, d, n)
        b = _randn(gen, g, n) if bias else None
        r = torch.rand(t, k, generator=gen).to(DEVICE) if rw else None
        idx = _indices(gen, t, k, g, rule)
        y = tritonlab.gather_matmul_scatter(x, w, idx, b, r, act, backend=backend)
        assert y.shape == (t, n)
        if t:
            ref = gg_ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.cpu().numpy(), np64(b), np64(r), act)
            assert_close(y, ref, TOL)

    check()


@pytest.mark.parametrize("backend", backends)
def test_leaf_mlp_matches_the_reference(backend):
    @_settings(_examples(backend, 100, 5))
    @given(grouping=_grouping(), d=st.integers(1, 30), h=st.integers(1, 24), o=st.integers(1, 30),
           act=st.sampled_from(["relu", "gelu", "silu", "swiglu", None]), bias=st.booleans(), rw=st.booleans(),
           seed=seeds)
    def check(grouping, d, h, o, act, bias, rw, seed):
        t, k, g, rule = grouping
        gen = torch.Generator().manual_seed(seed)
        x = _randn(gen, t, d)
        w1, w2 = _randn(gen, g, d, 2 * h if act == "swiglu" else h), _randn(gen, g, h, o)
        b1 = _randn(gen, g, w1.shape[2]) if bias else None
        b2 = _randn(gen, g, o) if bias else None
        r = torch.rand(t, k, generator=gen).to(DEVICE) if rw else None
        idx = _indices(gen, t, k, g, rule)
        y = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, act, route_weights=r, backend=backend)
        assert y.shape == (t, o)
        if t:
            ref = gg_ref.leaf_mlp_ref(np64(x), idx.cpu().numpy(), np64(w1), np64(b1), np64(w2), np64(b2), act, np64(r))
            assert_close(y, ref, TOL)

    check()


# ----------------------------------------------------------------------------- FFT mixing

@pytest.mark.parametrize("backend", backends)
def test_fft_mixing_matches_the_reference(backend):
    @_settings(_examples(backend, 120, 6))
    @given(b=st.integers(1, 3), s=st.integers(1, 70), d=st.integers(1, 9),
           op=st.sampled_from(["fnet", "filter", "causal", "circular"]), short=st.integers(0, 69), seed=seeds)
    def check(b, s, d, op, short, seed):
        gen = torch.Generator().manual_seed(seed)
        x = _randn(gen, b, s, d)
        if op == "fnet":
            y, ref = tritonlab.fnet_mix(x, backend=backend), fft_ref.fnet_mix_ref(np64(x))
        elif op == "filter":
            filt = torch.complex(_randn(gen, s // 2 + 1, d), _randn(gen, s // 2 + 1, d))
            y = tritonlab.spectral_filter(x, filt, backend=backend)
            ref = fft_ref.spectral_filter_ref(np64(x), filt.cpu().numpy().astype(np.complex128))
        else:
            kern = _randn(gen, s - short % s, d)  # any kernel length from 1 to S
            y = tritonlab.fft_conv(x, kern, causal=op == "causal", backend=backend)
            ref = fft_ref.fft_conv_ref(np64(x), np64(kern), causal=op == "causal")
        assert y.shape == x.shape
        assert_close(y, ref, TOL)

    check()
