"""gather_matmul_scatter, leaf_mlp, LeafMLP and the device grouping, against float64 references, both backends."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tritonlab
from tritonlab.kernels._backend import SMALL_TILE, torch_activation
from tritonlab.kernels._tuning import registered
from tritonlab.kernels.grouped_gemm import ops as gops
from tritonlab.kernels.grouped_gemm import reference as ref
from tritonlab.kernels.grouped_gemm.fallback import SlotLayout
from tritonlab.kernels.grouped_gemm.grouping import ONE_LAUNCH_MAX_GROUPS, ONE_LAUNCH_MAX_SLOTS, CountedGrouping, DeviceGrouping

from helpers import (DTYPES, assert_close, check_grads, graph_replay, np64, rand, record_launches,
                     run_in_fresh_thread, tolerance)


def routing(t, k, g, kind, device):
    """int64 [t, k] group ids. uniform: distinct per token; skew: every token's first choice is one
    group; dup: choices may repeat within a token; sparse: uniform over many groups (most empty or one-token)."""
    if kind == "uniform" and k <= g:
        idx = torch.rand(t, g).argsort(1)[:, :k]
    else:
        idx = torch.randint(0, g, (t, k))
    if kind == "skew":
        idx[:, 0] = g // 2
    return idx.to(device)


def route_weights(t, k, device, dtype=torch.float32):
    return torch.softmax(torch.randn(t, k), 1).to(device=device, dtype=dtype)


def gms_inputs(t, k, g, d, n, dtype, device, kind="uniform", bias=True, rw=True):
    x = rand(t, d, dtype=dtype, device=device)
    w = rand(g, d, n, dtype=dtype, device=device, scale=d**-0.5)
    b = rand(g, n, dtype=dtype, device=device, scale=0.5) if bias else None
    return x, w, routing(t, k, g, kind, device), b, (route_weights(t, k, device) if rw else None)


def leaf_inputs(t, k, g, d, h, o, activation, dtype, device, kind="uniform", bias=True, rw=True):
    h1 = 2 * h if activation == "swiglu" else h
    x = rand(t, d, dtype=dtype, device=device)
    w1 = rand(g, d, h1, dtype=dtype, device=device, scale=d**-0.5)
    w2 = rand(g, h, o, dtype=dtype, device=device, scale=h**-0.5)
    b1 = rand(g, h1, dtype=dtype, device=device, scale=0.5) if bias else None
    b2 = rand(g, o, dtype=dtype, device=device, scale=0.5) if bias else None
    return x, routing(t, k, g, kind, device), w1, b1, w2, b2, (route_weights(t, k, device) if rw else None)


# ----------------------------------------------------------------------------- forward vs reference

GMS_CASES = [  # t, k, g, d, n, activation, bias, rw, routing
    (1, 1, 3, 40, 24, "relu", True, False, "uniform"),
    (37, 2, 5, 40, 24, "gelu", True, True, "uniform"),
    (53, 1, 4, 33, 17, None, True, False, "skew"),
    (29, 8, 11, 20, 35, "silu", False, True, "uniform"),
    (40, 2, 64, 16, 20, "gelu_tanh", True, True, "sparse"),
    (9, 8, 3, 18, 16, "relu", True, True, "dup"),
    (20, 3, 7, 24, 40, "gelu", True, True, "skew"),  # 60 slots: the direct (decode) plan
]


@pytest.mark.parametrize("case", GMS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gather_matmul_scatter_matches_reference(backend, device, case):
    t, k, g, d, n, act, bias, rw, kind = case
    x, w, idx, b, r = gms_inputs(t, k, g, d, n, torch.float32, device, kind, bias, rw)
    y = tritonlab.gather_matmul_scatter(x, w, idx, b, r, act, backend=backend)
    assert y.shape == (t, n) and y.dtype == torch.float32
    expected = ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.cpu().numpy(), np64(b), np64(r), act)
    assert_close(y, expected, tolerance(torch.float32))


LEAF_CASES = [  # t, k, g, d, h, o, activation, bias, rw, routing
    (1, 1, 3, 40, 19, 23, "relu", True, False, "uniform"),
    (37, 2, 5, 40, 19, 23, "swiglu", True, True, "uniform"),
    (61, 1, 6, 33, 16, 29, "gelu", True, False, "skew"),
    (23, 8, 9, 24, 12, 20, "silu", False, True, "uniform"),
    (40, 2, 64, 16, 8, 18, None, True, True, "sparse"),
    (30, 2, 6, 20, 16, 24, "swiglu", True, True, "uniform"),  # 60 slots: the direct (decode) plan
    (33, 2, 4, 20, 130, 17, "relu", True, True, "skew"),  # hidden too wide for the fused kernel: two launches
    (25, 3, 7, 20, 16, 18, "gelu", True, False, "uniform"),  # k > 1 without route weights: plain sums
    (30, 8, 65536, 8, 8, 12, "swiglu", True, True, "sparse"),  # FFF depth 16 leaves, k = 8
]


@pytest.mark.parametrize("case", LEAF_CASES, ids=lambda c: "-".join(map(str, c)))
def test_leaf_mlp_matches_reference(backend, device, case):
    t, k, g, d, h, o, act, bias, rw, kind = case
    x, idx, w1, b1, w2, b2, r = leaf_inputs(t, k, g, d, h, o, act, torch.float32, device, kind, bias, rw)
    y = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, act, r, backend=backend)
    assert y.shape == (t, o) and y.dtype == torch.float32
    expected = ref.leaf_mlp_ref(np64(x), idx.cpu().numpy(), np64(w1), np64(b1), np64(w2), np64(b2), act, np64(r))
    assert_close(y, expected, tolerance(torch.float32))


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "layout"])
def test_both_cpu_fallback_paths_match_reference(monkeypatch, in_place):
    """The torch fallback's two forward paths on every case above: weights read in place per slot
    (small batches) and the grouped layout (forced either way through the in-place path's cost)."""
    from tritonlab.kernels.grouped_gemm import fallback

    monkeypatch.setattr(fallback, "_IN_PLACE_ELEMENT_COST", 0 if in_place else 1e30)
    for t, k, g, d, n, act, bias, rw, kind in GMS_CASES:
        x, w, idx, b, r = gms_inputs(t, k, g, d, n, torch.float32, "cpu", kind, bias, rw)
        y = fallback.gather_matmul_scatter_torch(x, w, idx, b, r, act)
        assert_close(y, ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.numpy(), np64(b), np64(r), act),
                     tolerance(torch.float32))
    for t, k, g, d, h, o, act, bias, rw, kind in LEAF_CASES:
        x, idx, w1, b1, w2, b2, r = leaf_inputs(t, k, g, d, h, o, act, torch.float32, "cpu", kind, bias, rw)
        y = fallback.leaf_mlp_torch(x, idx, w1, b1, w2, b2, act, r)
        assert_close(y, ref.leaf_mlp_ref(np64(x), idx.numpy(), np64(w1), np64(b1), np64(w2), np64(b2), act, np64(r)),
                     tolerance(torch.float32))
    x, idx, w1, b1, w2, b2, r = leaf_inputs(9, 2, 4, 16, 8, 12, "swiglu", torch.bfloat16, "cpu")
    y = fallback.leaf_mlp_torch(x, idx, w1, b1, w2, b2, "swiglu", r)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref.leaf_mlp_ref(*(np64(a) for a in (x, idx, w1, b1, w2, b2)), "swiglu", np64(r)),
                 tolerance(torch.bfloat16))


def test_nan_token_stays_nan_through_relu(backend, device):
    """A NaN in one token's input makes that token's output NaN (relu keeps NaN, as torch.relu does)
    and leaves every other token finite."""
    x, idx = rand(7, 24, device=device), routing(7, 2, 3, "uniform", device)
    x[4, 5] = float("nan")
    w1, w2 = rand(3, 24, 10, device=device), rand(3, 10, 12, device=device)
    ys = [tritonlab.gather_matmul_scatter(x, w1, idx, activation="relu", backend=backend),
          tritonlab.leaf_mlp(x, idx, w1, None, w2, None, "relu", backend=backend)]
    for y in ys:
        assert torch.isnan(y[4]).all() and torch.isfinite(y[[0, 1, 2, 3, 5, 6]]).all()


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_half_precision(backend, device, dtype):
    x, w, idx, b, r = gms_inputs(45, 2, 6, 40, 24, dtype, device)
    y = tritonlab.gather_matmul_scatter(x, w, idx, b, r, "relu", backend=backend)
    assert y.dtype == dtype
    assert_close(y, ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.cpu().numpy(), np64(b), np64(r), "relu"), tolerance(dtype))
    x, idx, w1, b1, w2, b2, r = leaf_inputs(45, 2, 6, 40, 16, 24, "swiglu", dtype, device)
    y = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "swiglu", r.to(dtype), backend=backend)
    assert y.dtype == dtype
    expected = ref.leaf_mlp_ref(*(np64(a) for a in (x, idx, w1, b1, w2, b2)), "swiglu", np64(r.to(dtype)))
    assert_close(y, expected, tolerance(dtype))


def test_every_token_in_one_group(backend, device):
    """Maximal skew: one group holds all T rows (many tiles of one group), the others are empty."""
    x, _, w1, b1, w2, b2, r = leaf_inputs(150, 1, 7, 24, 16, 20, "relu", torch.float32, device)
    idx = torch.full((150,), 5, device=device)
    y = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "relu", r[:, 0], backend=backend)
    assert_close(y, ref.leaf_mlp_ref(np64(x), idx.cpu().numpy(), np64(w1), np64(b1), np64(w2), np64(b2), "relu",
                                     np64(r[:, 0])), tolerance(torch.float32))


def test_65536_groups_small_width(backend, device):
    """FFF depth 16: G = 65536 groups, almost all empty; the grid scales with T*k, not with G."""
    g, d, n, t, k = 65536, 8, 16, 21, 2
    x, w, idx, b, r = gms_inputs(t, k, g, d, n, torch.float32, device, "sparse")
    idx[0, 0], idx[1, 0] = 0, g - 1  # both ends of the id range
    y = tritonlab.gather_matmul_scatter(x, w, idx, b, r, "relu", backend=backend)
    assert_close(y, ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.cpu().numpy(), np64(b), np64(r), "relu"),
                 tolerance(torch.float32))
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    tritonlab.gather_matmul_scatter(xs, ws, idx, None, r, None, backend=backend).sum().backward()
    touched = torch.zeros(g, dtype=torch.bool, device=device)
    touched[idx.reshape(-1)] = True
    assert (ws.grad[~touched] == 0).all()  # untouched groups get exact zero gradients
    expected = np.zeros((g, d, n))
    np.add.at(expected, idx.cpu().numpy(), (np64(x)[:, None, :, None] * np64(r)[:, :, None, None]))
    assert_close(ws.grad[touched], expected[touched.cpu().numpy()], tolerance(torch.float32))


def test_65536_tokens_torch_fallback():
    t, k, g, d, n = 65536, 2, 64, 16, 8
    x, w, idx, b, r = gms_inputs(t, k, g, d, n, torch.float32, "cpu")
    y = tritonlab.gather_matmul_scatter(x, w, idx, b, r, "silu", backend="torch")
    assert_close(y, ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.numpy(), np64(b), np64(r), "silu"), tolerance(torch.float32))
    x, idx, w1, b1, w2, b2, r = leaf_inputs(t, 1, 256, 16, 8, 12, "relu", torch.float32, "cpu", kind="skew")
    y = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "relu", None, backend="torch")
    assert_close(y, ref.leaf_mlp_ref(np64(x), idx.numpy(), np64(w1), np64(b1), np64(w2), np64(b2), "relu"), tolerance(torch.float32))


def test_leading_dims_and_empty(backend, device):
    x, w, idx, b, r = gms_inputs(6, 2, 4, 20, 12, torch.float32, device)
    y = tritonlab.gather_matmul_scatter(x.reshape(2, 3, 20), w, idx.reshape(2, 3, 2), b, r.reshape(2, 3, 2), "relu", backend=backend)
    assert y.shape == (2, 3, 12)
    assert_close(y.reshape(6, 12), ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.cpu().numpy(), np64(b), np64(r), "relu"),
                 tolerance(torch.float32))
    x0 = rand(2, 0, 20, device=device).requires_grad_()
    y0 = tritonlab.gather_matmul_scatter(x0, w, torch.zeros(2, 0, 3, dtype=torch.int64, device=device), backend=backend)
    assert y0.shape == (2, 0, 12)
    y0.sum().backward()
    assert x0.grad.shape == x0.shape
    w1, w2 = rand(4, 20, 8, device=device), rand(4, 8, 5, device=device)
    assert tritonlab.leaf_mlp(rand(0, 20, device=device), torch.zeros(0, dtype=torch.int32, device=device), w1, None, w2, None,
                              backend=backend).shape == (0, 5)


def test_direct_and_sorted_plans_agree(device, monkeypatch):
    """The decode plan (no sort) and the sorted plan give the same results (Triton path)."""
    from tritonlab.kernels.grouped_gemm import ops
    x, idx, w1, b1, w2, b2, r = leaf_inputs(25, 2, 9, 24, 16, 20, "gelu", torch.float32, device, "skew")
    direct = ops.leaf_mlp_triton(x, idx, w1, b1, w2, b2, "gelu", r)
    monkeypatch.setattr(ops, "DIRECT_MAX_SLOTS", 0)
    assert_close(ops.leaf_mlp_triton(x, idx, w1, b1, w2, b2, "gelu", r), direct, tolerance(torch.float32))


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_fused_and_two_launch_leaf_paths_agree(device, monkeypatch, act):
    """The one-launch leaf MLP (narrow hidden layers) and the two-GEMM path give the same results."""
    from tritonlab.kernels.grouped_gemm import ops
    x, idx, w1, b1, w2, b2, r = leaf_inputs(71, 2, 5, 24, 20, 19, act, torch.float32, device, "skew")
    fused = ops.leaf_mlp_triton(x, idx, w1, b1, w2, b2, act, r)
    monkeypatch.setattr(ops, "FUSED_MAX_HIDDEN", 0)
    assert_close(ops.leaf_mlp_triton(x, idx, w1, b1, w2, b2, act, r), fused, tolerance(torch.float32))


def test_cpu_forward_path_choice_for_fff_leaves(monkeypatch):
    """The fallback's own choice for FFF leaves (D=768, G=256, H=16, uniform routing), as its
    docstring states it: weights read in place up to T=1024, the padded layout from T=2048."""
    from tritonlab.kernels.grouped_gemm import fallback
    built = []

    class Recorded(fallback.SlotLayout):
        def __init__(self, *args, **kwargs):
            built.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fallback, "SlotLayout", Recorded)
    for t, layout in [(1, False), (256, False), (1024, False), (2048, True), (4096, True)]:
        built.clear()
        x, idx, w1, b1, w2, b2, _ = leaf_inputs(t, 1, 256, 768, 16, 768, "relu", torch.float32, "cpu")
        y = fallback.leaf_mlp_torch(x, idx, w1, b1, w2, b2, "relu")
        assert bool(built) == layout, t
        rows = torch.randperm(t)[:50]  # the float64 reference on a sample of the rows
        assert_close(y[rows], ref.leaf_mlp_ref(np64(x[rows]), idx[rows].numpy(), np64(w1), np64(b1), np64(w2), np64(b2),
                                               "relu"), tolerance(torch.float32))


@pytest.mark.parametrize("mode_cost", [-(10**12), 10**12], ids=["sorted", "padded"])
def test_cpu_fallback_layouts(mode_cost, monkeypatch):
    """Both CPU layouts (torch._grouped_mm over sorted rows, padded batched matmuls), forward and backward."""
    from tritonlab.kernels.grouped_gemm import fallback
    monkeypatch.setattr(fallback, "_GROUP_CALL_OVERHEAD", mode_cost)
    monkeypatch.setattr(fallback, "_IN_PLACE_ELEMENT_COST", 1e30)  # these shapes would take the in-place path
    x, idx, w1, b1, w2, b2, r = leaf_inputs(33, 2, 5, 20, 12, 16, "swiglu", torch.float32, "cpu", "skew")
    assert fallback.SlotLayout(idx, 5, 1, 1, widths=(20, 24, 12, 16)).sorted_mode == (mode_cost < 0 and fallback._grouped_mm_works())
    dy = rand(33, 16)
    check_grads(lambda *a: tritonlab.leaf_mlp(a[0], idx, *a[1:5], "swiglu", a[5], backend="torch"),
                 lambda *a: leaf_formula(a[0], idx, *a[1:5], "swiglu", a[5]), [x, w1, b1, w2, b2, r], dy)
    x, w, idx, b, r = gms_inputs(33, 3, 5, 20, 12, torch.float32, "cpu", "skew")
    check_grads(lambda x_, w_, b_, r_: tritonlab.gather_matmul_scatter(x_, w_, idx, b_, r_, "silu", backend="torch"),
                 lambda x_, w_, b_, r_: gms_formula(x_, w_, idx, b_, r_, "silu"), [x, w, b, r], rand(33, 12))


def test_k_gt_1_is_deterministic(backend, device):
    """Same inputs, same bits: per-slot results are summed in a fixed order (no atomics)."""
    x, w, idx, b, r = gms_inputs(67, 8, 12, 40, 24, torch.float32, device, "skew")
    y1 = tritonlab.gather_matmul_scatter(x, w, idx, b, r, "gelu", backend=backend)
    y2 = tritonlab.gather_matmul_scatter(x, w, idx, b, r, "gelu", backend=backend)
    assert torch.equal(y1, y2)
    x, idx, w1, b1, w2, b2, r = leaf_inputs(67, 2, 5, 24, 16, 20, "relu", torch.float32, device)
    y1 = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "relu", r, backend=backend)
    y2 = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "relu", r, backend=backend)
    assert torch.equal(y1, y2)


# ----------------------------------------------------------------------------- backward

def _act64(z, name):
    if name == "swiglu":
        h = z.shape[-1] // 2
        return F.silu(z[..., :h]) * z[..., h:]
    return torch_activation(z, name)


def gms_formula(x, w, idx, b, rw, act):
    """The DESIGN.md formula in plain torch (float64, autograd reference)."""
    z = torch.einsum("td,tkdn->tkn", x, w[idx]) + (0 if b is None else b[idx])
    return ((1 if rw is None else rw[..., None]) * _act64(z, act)).sum(1)


def leaf_formula(x, idx, w1, b1, w2, b2, act, rw):
    u = torch.einsum("td,tkdn->tkn", x, w1[idx]) + (0 if b1 is None else b1[idx])
    v = torch.einsum("tkh,tkho->tko", _act64(u, act), w2[idx]) + (0 if b2 is None else b2[idx])
    return ((1 if rw is None else rw[..., None]) * v).sum(1)


@pytest.mark.parametrize("act,bias,rw,k", [("gelu", True, True, 2), (None, False, False, 3), ("relu", True, False, 1),
                                           (None, True, True, 1)])
def test_gather_matmul_scatter_backward(backend, device, act, bias, rw, k):
    x, w, idx, b, r = gms_inputs(31, k, 6, 20, 18, torch.float32, device, "skew", bias, rw)
    dy = rand(31, 18, device=device)
    check_grads(lambda x_, w_, b_, r_: tritonlab.gather_matmul_scatter(x_, w_, idx, b_, r_, act, backend=backend),
                 lambda x_, w_, b_, r_: gms_formula(x_, w_, idx, b_, r_, act), [x, w, b, r], dy)


@pytest.mark.parametrize("act,bias,rw,k", [("relu", True, True, 2), ("swiglu", True, True, 1), ("gelu_tanh", False, False, 3),
                                           ("silu", False, True, 2)])
def test_leaf_mlp_backward(backend, device, act, bias, rw, k):
    x, idx, w1, b1, w2, b2, r = leaf_inputs(29, k, 5, 20, 12, 17, act, torch.float32, device, "uniform", bias, rw)
    dy = rand(29, 17, device=device)
    check_grads(lambda *a: tritonlab.leaf_mlp(a[0], idx, *a[1:5], act, a[5], backend=backend),
                 lambda *a: leaf_formula(a[0], idx, *a[1:5], act, a[5]), [x, w1, b1, w2, b2, r], dy)


def test_leaf_mlp_module_trains(device):
    """LeafMLP behind a learned top-2 router: the loss falls, and every parameter gets a gradient."""
    layer = tritonlab.LeafMLP(6, 12, 8, 5, "swiglu", backend="torch").to(device)
    router = torch.nn.Linear(12, 6).to(device)
    x, target = rand(64, 12, device=device), rand(64, 5, device=device)
    opt = torch.optim.Adam(list(layer.parameters()) + list(router.parameters()), lr=2e-2)

    def loss_fn():
        probs = torch.softmax(router(x), -1)
        rw, idx = probs.topk(2, dim=-1)
        return (layer(x, idx, rw) - target).square().mean()

    first = loss_fn().item()
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first
    opt.zero_grad()
    loss_fn().backward()
    for p in list(layer.parameters()) + list(router.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_leaf_mlp_module_triton_matches_torch(device):
    layer = tritonlab.LeafMLP(5, 16, 16, 10, "relu").to(device)
    x, idx, r = rand(21, 16, device=device), routing(21, 2, 5, "uniform", device), route_weights(21, 2, device)
    grads = []
    for backend in ("triton", "torch"):
        layer.backend = backend
        layer.zero_grad()
        y = layer(x, idx, r)
        y.square().sum().backward()
        grads.append([y.detach()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert_close(a, b, 2 * tolerance(torch.float32))


def test_ops_hold_in_a_compiled_graph(device):
    """torch.compile(fullgraph=True) traces forward and backward (fake impls; no range-check sync)."""
    x, w, idx, b, r = gms_inputs(11, 2, 4, 16, 8, torch.float32, device)
    w1, w2 = rand(4, 16, 6, device=device), rand(4, 6, 8, device=device)

    def layer(x_, w_, r_):
        return (tritonlab.gather_matmul_scatter(x_, w_, idx, b, r_, "relu", backend="torch")
                + tritonlab.leaf_mlp(x_, idx, w1, None, w2, None, "gelu", r_, backend="torch"))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (x, w, r)]
    y = compiled(*args)
    y.sum().backward()
    args_eager = [t.clone().requires_grad_() for t in (x, w, r)]
    y_eager = layer(*args_eager)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for a, e in zip(args, args_eager):
        torch.testing.assert_close(a.grad, e.grad)


# ----------------------------------------------------------------------------- grouping layouts

@pytest.mark.parametrize("g,t,k,block_m", [(1, 50, 1, 16), (7, 100, 2, 16), (64, 40, 3, 32), (65536, 30, 8, 16)])
def test_device_grouping_tiles_cover_every_row_once(device, g, t, k, block_m):
    idx = routing(t, k, g, "skew" if g < 10 else "sparse", device)
    grouping = DeviceGrouping(idx, g)
    tile_group, tile_row = (v.long().cpu() for v in grouping.tiles(block_m))
    offsets = grouping.offsets64.cpu()
    assert tile_group.shape[0] == -(-t * k // block_m) + min(g, t * k)
    real = tile_group < g
    covered = torch.zeros(t * k, dtype=torch.int64)
    for grp, row in zip(tile_group[real].tolist(), tile_row[real].tolist()):
        end = min(row + block_m, int(offsets[grp + 1]))
        assert offsets[grp] <= row < end  # a tile starts inside its group
        covered[row:end] += 1
    assert (covered == 1).all()
    assert torch.equal(grouping.sorted_group.cpu(), idx.reshape(-1).cpu()[grouping.order.cpu()])
    assert (torch.diff(grouping.sorted_group.cpu()) >= 0).all()
    nonempty = grouping.nonempty_groups().long().cpu()
    expected = torch.unique(idx.cpu())
    assert torch.equal(nonempty[: expected.numel()], expected) and (nonempty[expected.numel():] == g).all()


@pytest.mark.parametrize("one_launch", [False, True], ids=["counting", "one-launch"])
@pytest.mark.parametrize("g,t,k,kind", [(1, 50, 1, "uniform"), (7, 100, 2, "skew"), (64, 90, 3, "sparse"),
                                        (65, 120, 2, "skew"), (300, 257, 1, "sparse"), (512, 1024, 1, "sparse"),
                                        (1, 1, 1, "uniform"), (65536, 30, 8, "sparse")])
def test_counted_grouping_equals_the_sorted_grouping(device, g, t, k, kind, one_launch):
    """The forward groupings (counting sort; one-program sort for small problems) and the stable sort
    (backward) agree on counts, offsets and tile maps, and the forward rows hold every slot once, each
    in its own group: in any order within a group for the counting sort (g <= 64 takes its per-block
    one-hot counts, larger g one atomic per slot), in slot order for the one-program sort."""
    if one_launch and g > ONE_LAUNCH_MAX_GROUPS:
        pytest.skip("too many groups for the one-program sort")
    _check_counted_grouping(routing(t, k, g, kind, device), g, one_launch)


def test_group_plan_across_many_programs_with_a_partial_last_block(device, monkeypatch):
    """group_plan_kernel with 16 groups a program: 7 programs for G = 100 (the last one partial), each
    summing the counts of the blocks before it, and surplus tiles shared out among them (max_tiles >
    BLOCK_G). The real block widths (1024, 16384 under the interpreter) reach several programs only at
    G = 65536, with every block full."""
    from tritonlab.kernels.grouped_gemm import grouping as grouping_module

    monkeypatch.setattr(grouping_module, "PLAN_BLOCK_G", 16)
    monkeypatch.setattr(grouping_module, "PLAN_BLOCK_G_INTERPRETED", 16)
    for kind in ("uniform", "skew"):
        _check_counted_grouping(routing(300, 1, 100, kind, device), 100, one_launch=False)


def _check_counted_grouping(idx, g, one_launch):
    t, k = idx.shape
    counted, stable = CountedGrouping(idx, g, block_m=16, one_launch=one_launch), DeviceGrouping(idx, g)
    assert torch.equal(counted.offsets.cpu(), stable.offsets.cpu())
    assert torch.equal(counted.counts.long().cpu(), torch.bincount(idx.reshape(-1).cpu(), minlength=g))
    slots = counted.sorted_slot.long().cpu()
    assert torch.equal(torch.sort(slots).values, torch.arange(t * k))
    assert torch.equal(idx.reshape(-1).cpu()[slots], stable.sorted_group.cpu())
    if one_launch:
        assert torch.equal(slots, stable.order.cpu())  # stable: slot order within each group
    for block_m in (16, 32):
        (cg, cr), (sg, sr) = counted.tiles(block_m), stable.tiles(block_m)
        assert torch.equal(cg.cpu(), sg.cpu())
        real = sg.cpu() < g
        assert torch.equal(cr.cpu()[real], sr.cpu()[real])


def test_small_problems_group_in_one_launch(device, monkeypatch):
    """Up to ONE_LAUNCH_MAX_SLOTS slots and ONE_LAUNCH_MAX_GROUPS groups, without counts from a
    producer, the forward grouping is one launch; past either limit, or with counts, the counting sort."""
    from tritonlab.kernels.grouped_gemm import grouping as grouping_module

    names = ("group_sort_kernel", "group_count_kernel", "group_plan_kernel", "group_scatter_kernel")
    logs = {name: record_launches(monkeypatch, grouping_module, name) for name in names}
    cases = [((ONE_LAUNCH_MAX_SLOTS, 1), ONE_LAUNCH_MAX_GROUPS, False, (1, 0, 0, 0)),
             ((ONE_LAUNCH_MAX_SLOTS // 2 + 1, 2), 8, False, (0, 1, 1, 1)),
             ((100, 1), ONE_LAUNCH_MAX_GROUPS + 1, False, (0, 1, 1, 1)),
             ((100, 1), 8, True, (0, 0, 1, 1))]
    for (t, k), g, counted, expected in cases:
        for log in logs.values():
            log.clear()
        idx = routing(t, k, g, "uniform", device)
        state = None
        if counted:  # the producer of the ids filled in the counts (fff_forward's tree walk)
            state = CountedGrouping.new_state(g, device)
            state[:g] = torch.bincount(idx.reshape(-1), minlength=g).to(torch.int32)
        grouping = CountedGrouping(idx, g, state=state)
        assert tuple(len(logs[name]) for name in names) == expected, (t, k, g)
        assert torch.equal(grouping.offsets.cpu(), DeviceGrouping(idx, g).offsets.cpu())


@pytest.mark.parametrize("one_launch", [False, True], ids=["counting", "one-launch"])
def test_counted_grouping_leaves_out_of_range_ids(device, one_launch):
    idx = torch.tensor([[0, 5], [-1, 2], [3, 1], [2, 2]], device=device)
    counted = CountedGrouping(idx, 4, one_launch=one_launch)
    assert counted.offsets.tolist() == [0, 1, 2, 5, 6]
    assert counted.counts.tolist() == [1, 1, 3, 1]
    # slots 1 (id 5) and 2 (id -1) are in no group; the rows past offsets[G] are never read
    assert sorted(counted.sorted_slot[:6].tolist()) == [0, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("counts", [[40, 0, 0, 1, 1, 2], [5] * 8, [0] * 50 + [300], [1] * 200])
def test_slot_layout_places_every_slot_once(counts):
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = ids[torch.randperm(ids.numel())]
    lay = SlotLayout(ids.view(-1, 1), len(counts), row_cost=100, group_cost=1000)
    assert torch.equal(lay.src_slot[lay.pos], torch.arange(ids.numel()))  # pos and src_slot are inverse
    assert lay.rows >= ids.numel() and (lay.src_slot < ids.numel()).sum() == ids.numel()
    group_of_row = torch.cat([torch.arange(len(counts)).repeat_interleave(lay.cap),
                              lay.tile_group.repeat_interleave(lay.tile)])
    assert torch.equal(group_of_row[lay.pos], ids)  # each slot sits in a row of its own group


# ----------------------------------------------------------------------------- tuning registry

@pytest.mark.parametrize("name", ["grouped_gemm", "grouped_wgrad", "grouped_slot_sum", "leaf_mlp_fused"])
def test_registered_kernels_run_their_small_preset(device, name):
    kernel = registered()[name]
    for shape in kernel.presets["small"]:
        inputs = kernel.make_inputs(shape, torch.float32, device)
        configs = [kernel.default(shape)] + kernel.space(shape)[:1]
        for cfg in configs:
            assert kernel.error(inputs, kernel.run(inputs, cfg)) <= kernel.tolerance(torch.float32), cfg
    for shape in kernel.presets["models"]:
        assert kernel.space(shape) and kernel.default(shape)


# ----------------------------------------------------------------------------- bad input

def _bad_calls():
    x, w, b = rand(5, 8), rand(3, 8, 6), rand(3, 6)
    idx, rw = torch.randint(0, 3, (5, 2)), torch.rand(5, 2)
    idx[0] = torch.tensor([0, 2])  # so that idx - 1 and idx + 1 do leave [0, G) (random ids may not)
    w1, b1, w2, b2 = rand(3, 8, 4), rand(3, 4), rand(3, 4, 6), rand(3, 6)
    gms, leaf = tritonlab.gather_matmul_scatter, tritonlab.leaf_mlp
    return [
        ("indices", TypeError, lambda: gms(x, w, idx.float())),
        ("indices", TypeError, lambda: gms(x, w, idx.bool())),
        ("indices", ValueError, lambda: gms(x, w, idx - 1)),
        ("indices", ValueError, lambda: gms(x, w, idx + 1)),
        ("indices", ValueError, lambda: gms(x, w, torch.zeros(4, 2, dtype=torch.int64))),
        ("indices", ValueError, lambda: gms(x, w, torch.zeros(5, 0, dtype=torch.int64))),
        ("weight", ValueError, lambda: gms(x, rand(8, 6), idx)),
        ("weight", ValueError, lambda: gms(x, rand(3, 7, 6), idx)),
        ("weight", ValueError, lambda: gms(x, rand(0, 8, 6), idx[:, :0].reshape(5, 0))),
        ("weight", TypeError, lambda: gms(x, w.double(), idx)),
        ("bias", ValueError, lambda: gms(x, w, idx, rand(3, 5))),
        ("route_weights", ValueError, lambda: gms(x, w, idx, b, torch.rand(5, 3))),
        ("route_weights", TypeError, lambda: gms(x, w, idx, b, idx)),
        ("activation", ValueError, lambda: gms(x, w, idx, b, rw, "swiglu")),
        ("activation", ValueError, lambda: gms(x, w, idx, b, rw, "tanh")),
        ("x", TypeError, lambda: gms(x.long(), w, idx)),
        ("backend", ValueError, lambda: gms(x, w, idx, backend="cuda")),
        ("backend", ValueError, lambda: gms(x[:0], w, idx[:0], backend="cuda")),  # also with no tokens
        ("backend", ValueError, lambda: leaf(x[:0], idx[:0], w1, b1, w2, b2, backend="cuda")),
        ("weight", ValueError, lambda: gms(x, w.to("meta"), idx)),
        ("indices", ValueError, lambda: leaf(x, idx + 3, w1, b1, w2, b2)),
        ("w1", ValueError, lambda: leaf(x, idx, rand(3, 7, 4), b1, w2, b2)),
        ("w1", ValueError, lambda: leaf(x, idx, w1, b1, w2, b2, "swiglu")),
        ("w2", ValueError, lambda: leaf(x, idx, w1, b1, rand(4, 4, 6), b2)),
        ("w1", ValueError, lambda: leaf(x, idx, w1, b1, rand(3, 5, 6), b2)),
        ("b1", ValueError, lambda: leaf(x, idx, w1, rand(3, 5), w2, b2)),
        ("b2", ValueError, lambda: leaf(x, idx, w1, b1, w2, rand(3, 7))),
        ("w2", TypeError, lambda: leaf(x, idx, w1, b1, w2.half(), b2)),
        ("activation", ValueError, lambda: leaf(x, idx, w1, b1, w2, b2, "tanh")),
        ("route_weights", ValueError, lambda: leaf(x, idx, w1, b1, w2, b2, "relu", torch.rand(5))),
        # zero widths
        ("x", ValueError, lambda: gms(rand(5, 0), rand(3, 0, 6), idx)),
        ("weight", ValueError, lambda: gms(x, rand(3, 8, 0), idx)),
        ("w1", ValueError, lambda: leaf(x, idx, rand(3, 8, 0), None, rand(3, 0, 6), b2)),
        ("w2", ValueError, lambda: leaf(x, idx, w1, b1, rand(3, 4, 0), None)),
        ("backend", ValueError, lambda: tritonlab.LeafMLP(3, 8, 4, 6, backend="cuda")),
    ]


@pytest.mark.parametrize("name,exc,call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_clear_errors(name, exc, call):
    with pytest.raises(exc, match=name):
        call()


@pytest.mark.parametrize("t,k,g,h", [(5, 2, 3, 4), (40, 2, 3, 4), (90, 1, 4, 8), (70, 2, 4, 136)])
def test_out_of_range_indices_raise_on_every_path(backend, device, t, k, g, h):
    """Decode (direct, T*k <= 64), one-launch sort with the fused leaf (H <= 128) and with the two
    grouped GEMMs (H = 136): an id below 0, at G or far past it is a ValueError naming indices. The Triton path checks after its launches (the module docstring says
    why), so this also runs its kernels on those ids: they must not fault or read through them."""
    x, w, w1, w2 = rand(t, 8, device=device), rand(g, 8, 6, device=device), rand(g, 8, h, device=device), \
        rand(g, h, 6, device=device)
    for bad in (-1, g, 10**6):
        idx = torch.randint(0, g, (t, k), device=device)
        idx[t // 2, k - 1] = bad
        with pytest.raises(ValueError, match=f"indices must lie in \\[0, G\\) .* got {bad}"):
            tritonlab.gather_matmul_scatter(x, w, idx, backend=backend)
        with pytest.raises(ValueError, match=f"indices must lie in \\[0, G\\) .* got {bad}"):
            tritonlab.leaf_mlp(x, idx, w1, None, w2, None, backend=backend)


def test_out_of_range_indices_never_reach_a_kernel(device):
    """The grouping alone excludes out-of-range ids from every tile (what lets the Triton path check
    the range after its launches)."""
    idx = torch.tensor([[0, 5], [-1, 2], [3, 1]], device=device)
    grouping = DeviceGrouping(idx, 4)
    tile_group, tile_row = grouping.tiles(16)
    offsets = grouping.offsets64.cpu()
    assert int(offsets[0]) == 1 and int(offsets[-1]) == 5  # the -1 sorts first, the 5 last: in no group
    real = tile_group < 4
    assert tile_row[real].min() >= offsets[0] and (tile_row[real].long().cpu() < offsets[-1]).all()


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_shapes_match_reference(dtype):
    for t, k, g, d, h in [(4096, 2, 8, 1024, 1408), (64, 8, 64, 512, 352), (4096, 1, 256, 768, 64), (3, 2, 8, 256, 128)]:
        x, idx, w1, b1, w2, b2, r = leaf_inputs(t, k, g, d, h, d, "swiglu", dtype, "cuda")
        y = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "swiglu", r, backend="triton")
        y_torch = tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "swiglu", r, backend="torch")
        sample = torch.arange(0, t, max(1, t // 256), device="cuda")
        expected = ref.leaf_mlp_ref(np64(x[sample]), idx[sample].cpu().numpy(), *(np64(a) for a in (w1, b1, w2, b2)),
                                    "swiglu", np64(r[sample]))
        assert_close(y[sample], expected, tolerance(dtype))
        assert_close(y, y_torch.float(), 2 * tolerance(dtype))
        assert torch.equal(y, tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, "swiglu", r, backend="triton"))


@pytest.mark.gpu
def test_gpu_triton_path_has_no_host_sync():
    from tritonlab.kernels.grouped_gemm.ops import gather_matmul_scatter_triton, leaf_mlp_triton
    x, idx, w1, b1, w2, b2, r = leaf_inputs(1000, 2, 64, 256, 128, 256, "relu", torch.bfloat16, "cuda")
    leaf_mlp_triton(x, idx, w1, b1, w2, b2, "relu", r)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        leaf_mlp_triton(x, idx, w1, b1, w2, b2, "relu", r)
        gather_matmul_scatter_triton(x, w1, idx, b1, r, "gelu")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backward_matches_torch_backend(dtype):
    """Compiled kernels (wgrad, transposed-weight GEMMs, slot sums) against the torch fallback's gradients."""
    for t, k, g, act in [(3000, 2, 8, "swiglu"), (500, 8, 64, "gelu"), (2000, 1, 4096, "relu")]:
        x, idx, w1, b1, w2, b2, r = leaf_inputs(t, k, g, 256, 96, 200, act, dtype, "cuda", "skew")
        grads = []
        for backend in ("triton", "torch"):
            leaves = [a.detach().clone().requires_grad_() for a in (x, w1, b1, w2, b2, r)]
            y = tritonlab.leaf_mlp(leaves[0], idx, *leaves[1:5], act, leaves[5], backend=backend)
            y.float().square().sum().backward()
            grads.append([y.detach()] + [a.grad for a in leaves])
        for a, b in zip(*grads):
            assert_close(a, b.float(), 4 * tolerance(dtype))


@pytest.mark.gpu
def test_gpu_public_ops_capture_in_a_cuda_graph():
    """The public ops skip the index range check (a host sync) while a CUDA graph is captured; the
    replay gives the eager result bit for bit, at k = 1 (fused leaves) and k = 2 (two GEMMs)."""
    for t, k, g, h, act in [(3000, 1, 256, 16, "relu"), (2000, 2, 8, 160, "swiglu")]:
        x, idx, w1, b1, w2, b2, r = leaf_inputs(t, k, g, 256, h, 192, act, torch.bfloat16, "cuda", "skew")
        w = w1[..., :h].contiguous()
        for call in (lambda: tritonlab.leaf_mlp(x, idx, w1, b1, w2, b2, act, r),
                     lambda: tritonlab.gather_matmul_scatter(x, w, idx, None, r, "gelu")):
            eager = call()
            assert torch.equal(graph_replay(call)(), eager)


def test_gemm_config_fits_the_gpu_shared_memory(monkeypatch, device):
    """On a GPU with less shared memory than the H100 the defaults assume (an L4: 99 KB a block), the
    launcher fits the pipelined tiles: fewer stages, then narrower K tiles; the result is unchanged."""
    from tritonlab.kernels import _backend
    from tritonlab.kernels.grouped_gemm import ops

    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    monkeypatch.setattr(_backend, "shared_memory_per_block", lambda dev: 101376)
    fitted = _backend.fit_pipelined_tiles(big, 4, device)  # fp32: 3 x 64 KB of tiles -> 2 stages of 32 K
    assert fitted == dict(big, num_stages=2, BLOCK_K=32)
    assert (128 + 128) * 32 * 2 * 4 <= 101376 - 4096 < (128 + 128) * 64 * 2 * 4
    assert _backend.fit_pipelined_tiles(big, 2, device) == dict(big, num_stages=2)  # bf16: 64 KB at 2 stages fits
    monkeypatch.setattr(_backend, "shared_memory_per_block", lambda dev: None)
    assert _backend.fit_pipelined_tiles(big, 4, device) == big  # CPU / interpreter: no limit

    launched = record_launches(monkeypatch, ops, "grouped_gemm_kernel", "BLOCK_K", "num_stages")
    monkeypatch.setattr(_backend, "shared_memory_per_block", lambda dev: 101376)
    x, w = rand(37, 40, device=device), rand(3, 40, 24, device=device)
    idx = torch.randint(0, 3, (37, 2), device=device)
    per_slot = ops._gemm(DeviceGrouping(idx, 3), x, w, gather_a=True, scatter=True, config=big)  # [T * k, N]
    y = per_slot.view(37, 2, 24).sum(1)
    assert launched == [(32, 2)]
    assert_close(y, ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.cpu().numpy()), tolerance(torch.float32))


def test_cpu_fallback_works_after_a_call_under_inference_mode():
    """The CPU fallback's reused scratch buffers, first made under torch.inference_mode(), must not
    become inference tensors that later calls outside it cannot write (fresh thread: fresh buffers)."""
    def run():
        # large enough for the padded layout, which uses the scratch buffers
        x, w, idx = rand(600, 96), rand(8, 96, 256), routing(600, 2, 8, "uniform", "cpu")
        w1, w2 = rand(8, 96, 64), rand(8, 64, 96)
        with torch.inference_mode():
            tritonlab.gather_matmul_scatter(x, w, idx, backend="torch")
            tritonlab.leaf_mlp(x, idx, w1, None, w2, None, "relu", backend="torch")
        xg = x.clone().requires_grad_()
        y = tritonlab.gather_matmul_scatter(xg, w, idx, backend="torch")
        y.sum().backward()
        expected = ref.gather_matmul_scatter_ref(np64(x), np64(w), idx.numpy(), None, None, None)
        assert_close(y, expected, tolerance(torch.float32))
        z = tritonlab.leaf_mlp(x, idx, w1, None, w2, None, "relu", backend="torch")
        assert_close(z, ref.leaf_mlp_ref(np64(x), idx.numpy(), np64(w1), None, np64(w2), None, "relu"),
                     tolerance(torch.float32))

    run_in_fresh_thread(run)


@pytest.mark.parametrize("k", [1, 2])
def test_a_nan_token_spoils_only_its_own_groups_gradients(backend, device, k):
    """Token 0 holds a NaN: only the weight gradients of the groups it is routed to and its own dx row
    turn non-finite. (The padded layout's padding rows copy a real token's row: the torch backward
    zeroes them, since they meet the weights' gradient sums multiplied by zero.)"""
    t, d, h, o, g = 40, 5, 6, 3, 5
    x = rand(t, d, device=device)
    x[0, 2] = float("nan")
    idx = routing(t, k, g, "uniform", device)
    idx[:, 0] = torch.where(torch.arange(t, device=device) < 30, 1, idx[:, 0])  # a tall group: padding in the others
    hit = set(idx[0].tolist())
    w = rand(g, d, 4, device=device).requires_grad_()
    tritonlab.gather_matmul_scatter(x, w, idx, backend=backend).sum().backward()
    w1, w2 = rand(g, d, h, device=device).requires_grad_(), rand(g, h, o, device=device).requires_grad_()
    xg = x.clone().requires_grad_()
    tritonlab.leaf_mlp(xg, idx, w1, None, w2, None, "gelu", backend=backend).sum().backward()
    for grad in (w.grad, w1.grad, w2.grad):
        bad = {i for i in range(g) if not torch.isfinite(grad[i]).all()}
        assert bad == hit, (bad, hit)
    assert torch.isfinite(xg.grad[1:]).all() and not torch.isfinite(xg.grad[0]).all()


@pytest.mark.parametrize("name", ["grouped_gemm", "grouped_wgrad", "leaf_mlp_fused"])
def test_tuner_inputs_with_more_choices_than_groups(name, device):
    """A tuned shape may ask for k > G choices per token (ids then repeat): the tuner's inputs
    must still be consistent, or every config would fail its check (found by fuzzing: the builder
    gave min(k, G) ids per token while the route weights had k)."""
    kernel = registered()[name]
    shape = dict(kernel.presets["small"][0], k=3, G=2)
    inp = kernel.make_inputs(shape, torch.float32, device)
    assert kernel.error(inp, kernel.run(inp, kernel.default(shape))) <= kernel.tolerance(torch.float32)


@pytest.mark.parametrize("name, narrow", [("grouped_gemm", {"D": 12, "N": 16}), ("grouped_wgrad", {"D": 12, "N": 9}),
                                          ("leaf_mlp_fused", {"D": 12, "N": 16})])
def test_tuning_spaces_cover_narrow_shapes(name, narrow, device):
    """Widths of 16 or less (an FFF leaf of width 16) still get configs to tune, and they run right:
    the spaces started at 32-wide blocks and came out empty there."""
    kernel = registered()[name]
    shape = dict(kernel.presets["small"][0], **narrow)
    space = kernel.space(shape)
    assert space
    inp = kernel.make_inputs(shape, torch.float32, device)
    for config in (space[0], space[len(space) // 2], space[-1]):
        assert kernel.error(inp, kernel.run(inp, config)) <= kernel.tolerance(torch.float32), config


@pytest.mark.parametrize("name", ["grouped_gemm", "grouped_wgrad", "leaf_mlp_fused"])
def test_small_dot_tiles_never_get_eight_warps(name):
    """8 warps on a dot tile under SMALL_TILE elements is the setting that returned NaNs on an H100
    (Triton 3.6, an FFT kernel's [64, 16] tiles); no space or default of the grouped kernels offers it,
    narrow layers included."""
    kernel = registered()[name]
    for _ in range(6):
        t, d, n, h = (int(v) for v in torch.randint(1, 300, (4,)))
        narrow = int(torch.randint(1, 33, ()))
        shape = dict(kernel.presets["small"][0], T=t, D=narrow if t % 2 else d, N=n if t % 3 else narrow)
        if "H" in shape:
            shape["H"] = h % 140 + 1
        for cfg in kernel.space(shape) + [kernel.default(shape)]:
            if name == "grouped_wgrad":
                tile = cfg["BLOCK_D"] * cfg["BLOCK_N"]
            elif name == "leaf_mlp_fused":  # two dots: [M, hidden tile] and [M, N]
                tile = cfg["BLOCK_M"] * min(cfg["BLOCK_N"], gops._fused_hidden_tile(shape))
            else:
                tile = cfg["BLOCK_M"] * cfg["BLOCK_N"]
            assert cfg["num_warps"] < 8 or tile >= SMALL_TILE, (shape, cfg)
