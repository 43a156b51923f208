"""tree_route, fff_forward, fff_path_forward against the float64 NumPy references, both backends."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tritonlab
from tritonlab.kernels.tree_routing import reference as ref
from tritonlab.kernels._tuning import registered

from helpers import DTYPES, assert_close, check_grads, graph_replay, np64, rand, record_launches, tolerance

# A token whose logit at some node is within rounding of 0 may take either child in finite
# precision; inputs are drawn so that every token clears this margin (relative to |x| |w|).
MARGIN = 1e-3


def separated_tokens(t, d, nw, nb, dtype, device):
    """t random tokens (dtype) whose every routing decision clears MARGIN on the float64 reference."""
    if t == 0 or nw.shape[0] == 0:
        return rand(t, d, dtype=dtype, device=device)
    kept = []
    while sum(k.shape[0] for k in kept) < t:
        x = rand(4 * t + 8, d, dtype=dtype, device=device)
        ok = ref.route_margin_ref(np64(x), np64(nw), np64(nb)) >= MARGIN
        kept.append(x[torch.from_numpy(ok).to(device)])
    return torch.cat(kept)[:t]


def tree(depth, d, dtype, device, extra_level=False):
    n = 2 ** (depth + int(extra_level)) - 1
    return rand(n, d, dtype=dtype, device=device), rand(n, dtype=dtype, device=device, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth", [0, 1, 4, 9])
@pytest.mark.parametrize("t", [1, 37, 300])
def test_tree_route_matches_reference(backend, device, dtype, depth, t):
    d = 45
    nw, nb = tree(depth, d, dtype, device)
    x = separated_tokens(t, d, nw, nb, dtype, device)
    leaf = tritonlab.tree_route(x, nw, nb, backend=backend)
    assert leaf.dtype == torch.int32 and leaf.shape == (t,)
    np.testing.assert_array_equal(leaf.cpu().numpy(), ref.tree_route_ref(np64(x), np64(nw), np64(nb)))


def test_tree_route_depth_16_no_bias(backend, device):
    d = 8
    nw, _ = tree(16, d, torch.float32, device)
    x = separated_tokens(5, d, nw, None, torch.float32, device)
    leaf = tritonlab.tree_route(x, nw, backend=backend)
    np.testing.assert_array_equal(leaf.cpu().numpy(), ref.tree_route_ref(np64(x), np64(nw), None))
    assert leaf.max() < 2**16


def test_tree_route_keeps_leading_dims_and_empty(backend, device):
    nw, nb = tree(3, 20, torch.float32, device)
    x = separated_tokens(6, 20, nw, nb, torch.float32, device).reshape(2, 3, 20)
    leaf = tritonlab.tree_route(x, nw, nb, backend=backend)
    assert leaf.shape == (2, 3)
    np.testing.assert_array_equal(leaf.reshape(-1).cpu().numpy(), ref.tree_route_ref(np64(x.reshape(6, 20)), np64(nw), np64(nb)))
    for shape in [(0, 20), (2, 0, 20)]:
        empty = tritonlab.tree_route(rand(*shape, device=device), nw, nb, backend=backend)
        assert empty.shape == shape[:-1] and empty.dtype == torch.int32


@pytest.mark.parametrize("config,depth", [
    ({"BLOCK_T": 16, "BLOCK_D": 32, "DENSE_LEVELS": 0, "num_warps": 2}, 6),
    ({"BLOCK_T": 32, "BLOCK_D": 16, "DENSE_LEVELS": 2, "num_warps": 4}, 6),
    ({"BLOCK_T": 16, "BLOCK_D": 64, "DENSE_LEVELS": 6, "num_warps": 4}, 6),
    ({"BLOCK_T": 16, "BLOCK_D": 32, "DENSE_LEVELS": 7, "num_warps": 4}, 8),
    ({"BLOCK_T": 32, "BLOCK_D": 64, "DENSE_LEVELS": 8, "num_warps": 8}, 8),
])
def test_tree_route_every_dense_split_is_exact(device, config, depth):
    """The tunable split (top levels as a tile product, the rest gathered; all 8 levels dense at
    most) never changes a leaf."""
    kernel = registered()["tree_route"]
    nw, nb = tree(depth, 70, torch.float32, device)
    x = separated_tokens(53, 70, nw, nb, torch.float32, device)
    out = kernel.run({"x": x, "w": nw, "b": nb}, config)
    assert kernel.error({"x": x, "w": nw, "b": nb}, out) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth,t,activation", [
    (0, 1, "relu"), (3, 1, "gelu"), (3, 37, "silu"), (7, 64, "relu"), (7, 150, "gelu"), (3, 200, "gelu_tanh"),
])
def test_fff_forward_matches_reference(backend, device, dtype, depth, t, activation):
    d, h, o = 45, 19, 23
    n_leaves = 2**depth
    nw, nb = tree(depth, d, dtype, device)
    x = separated_tokens(t, d, nw, nb, dtype, device)
    w1, b1 = rand(n_leaves, d, h, dtype=dtype, device=device, scale=d**-0.5), rand(n_leaves, h, dtype=dtype, device=device)
    w2, b2 = rand(n_leaves, h, o, dtype=dtype, device=device, scale=h**-0.5), rand(n_leaves, o, dtype=dtype, device=device)
    y = tritonlab.fff_forward(x, nw, nb, w1, b1, w2, b2, activation, backend=backend)
    assert y.dtype == dtype and y.shape == (t, o)
    expected = ref.fff_forward_ref(*(np64(a) for a in (x, nw, nb, w1, b1, w2, b2)), activation)
    assert_close(y, expected, tolerance(dtype))


def test_fff_forward_without_biases_and_leaf_counts(backend, device):
    depth, d, h, o, t = 4, 33, 8, 12, 90
    nw, _ = tree(depth, d, torch.float32, device)
    x = separated_tokens(t, d, nw, None, torch.float32, device)
    w1, w2 = rand(16, d, h, device=device), rand(16, h, o, device=device)
    y, counts = tritonlab.fff_forward(x, nw, None, w1, None, w2, None, None, return_leaf_counts=True, backend=backend)
    assert_close(y, ref.fff_forward_ref(np64(x), np64(nw), None, np64(w1), None, np64(w2), None, None), tolerance(torch.float32))
    leaves = ref.tree_route_ref(np64(x), np64(nw), None)
    np.testing.assert_array_equal(counts.cpu().numpy(), np.bincount(leaves, minlength=16))
    assert counts.sum() == t


@pytest.mark.parametrize("depth,t", [(0, 5), (5, 2), (5, 64)])
def test_fff_decode_grouped_choice_matches_the_fused_kernel(device, depth, t):
    """The decode tunable's GROUPED config (route, then the grouped leaves) against the reference and
    the fused route-plus-leaf kernel (Triton path, interpreter on CPU)."""
    from tritonlab.kernels.tree_routing import ops as tree_ops

    d, h, o = 40, 20, 24
    nw, nb = tree(depth, d, torch.float32, device)
    x = separated_tokens(t, d, nw, nb, torch.float32, device)
    args = (x, nw, nb, rand(2**depth, d, h, device=device, scale=d**-0.5), rand(2**depth, h, device=device),
            rand(2**depth, h, o, device=device, scale=h**-0.5), rand(2**depth, o, device=device))
    shape = {"T": t, "D": d, "H": h, "O": o, "depth": depth}
    assert {"GROUPED": 1} in registered()["fff_decode"].space(shape)
    grouped, leaf_g = tree_ops._fff_small_batch(*args, "gelu", config={"GROUPED": 1})
    fused, leaf_f = tree_ops._fff_small_batch(*args, "gelu", config=registered()["fff_decode"].default(shape))
    assert_close(grouped, ref.fff_forward_ref(*(np64(a) for a in args), "gelu"), tolerance(torch.float32))
    assert_close(grouped, fused, tolerance(torch.float32))
    assert torch.equal(leaf_g.long(), leaf_f.long())


def test_fff_forward_depth_12_decode_and_batch(backend, device):
    depth, d, h, o = 12, 16, 4, 8
    nw, nb = tree(depth, d, torch.float32, device)
    w1, b1 = rand(2**depth, d, h, device=device), rand(2**depth, h, device=device)
    w2, b2 = rand(2**depth, h, o, device=device), rand(2**depth, o, device=device)
    for t in (3, 100):
        x = separated_tokens(t, d, nw, nb, torch.float32, device)
        y = tritonlab.fff_forward(x, nw, nb, w1, b1, w2, b2, "relu", backend=backend)
        assert_close(y, ref.fff_forward_ref(*(np64(a) for a in (x, nw, nb, w1, b1, w2, b2)), "relu"), tolerance(torch.float32))


@pytest.mark.parametrize("t", [3, 70])  # the fused decode kernel and the grouped path
def test_nan_token_stays_nan_through_relu(backend, device, t):
    """A NaN in one token makes that token's output NaN (relu keeps NaN, as torch.relu does; its
    route takes the left child, NaN >= 0 being false) and leaves every other token finite."""
    depth, d, h, o = 3, 20, 6, 9
    nw, nb = tree(depth, d, torch.float32, device)
    x = separated_tokens(t, d, nw, nb, torch.float32, device)
    x[1, 3] = float("nan")
    w1, w2 = rand(2**depth, d, h, device=device), rand(2**depth, h, o, device=device)
    w_in, w_out = rand(2**(depth + 1) - 1, d, device=device), rand(2**(depth + 1) - 1, o, device=device)
    for y in (tritonlab.fff_forward(x, nw, nb, w1, None, w2, None, "relu", backend=backend),
              tritonlab.fff_path_forward(x, w_in, w_out, None, "relu", backend=backend)):
        others = torch.ones(t, dtype=torch.bool)
        others[1] = False
        assert torch.isnan(y[1]).all() and torch.isfinite(y[others.to(y.device)]).all()


@pytest.mark.parametrize("one_launch_max_slots", [16, 1024])
def test_fff_forward_grouped_path_with_and_without_walk_counts(device, monkeypatch, one_launch_max_slots):
    """Above the decode size the leaves run grouped: small batches group in one launch; larger ones
    (here: the one-launch limit lowered to 16 slots) take the counting sort, whose counts the tree
    walk adds up as it routes (COUNT_LEAVES). Both agree with the reference and count every leaf."""
    from tritonlab.kernels.grouped_gemm import grouping

    monkeypatch.setattr(grouping, "ONE_LAUNCH_MAX_SLOTS", one_launch_max_slots)
    depth, d, h, o, t = 5, 24, 8, 12, 150
    nw, nb = tree(depth, d, torch.float32, device)
    w1, b1 = rand(2**depth, d, h, device=device), rand(2**depth, h, device=device)
    w2, b2 = rand(2**depth, h, o, device=device), rand(2**depth, o, device=device)
    x = separated_tokens(t, d, nw, nb, torch.float32, device)
    y, counts = tritonlab.fff_forward(x, nw, nb, w1, b1, w2, b2, "gelu", return_leaf_counts=True, backend="triton")
    args = [np64(a) for a in (x, nw, nb, w1, b1, w2, b2)]
    assert_close(y, ref.fff_forward_ref(*args, "gelu"), tolerance(torch.float32))
    leaves = ref.tree_route_ref(*args[:3])
    assert counts.tolist() == np.bincount(leaves, minlength=2**depth).tolist()


@pytest.mark.parametrize("t", [1, 63, 64, 200])  # below and from SAMPLED_DOT_MIN_TOKENS
@pytest.mark.parametrize("top", [None, 0, 1, 3, 7])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_walk_every_split_of_dense_and_gathered_levels(t, top, bias):
    """The torch walk: any number of densely computed top levels (None: its own choice), the rest by
    per-token dot products (gathered rows or the sampled matmul), gives the reference's path and logits."""
    from tritonlab.kernels.tree_routing.fallback import tree_walk_torch
    depth, d = 7, 33
    nw, nb = tree(depth, d, torch.float32, "cpu")
    nb = nb if bias else None
    x = separated_tokens(t, d, nw, nb, torch.float32, "cpu")
    node, path, logits = tree_walk_torch(x, nw, nb, depth, record_path=True, top=top)
    ref_path, ref_logits, ref_node = ref.tree_walk_ref(np64(x), np64(nw), None if nb is None else np64(nb), depth)
    np.testing.assert_array_equal(node.numpy(), ref_node)
    np.testing.assert_array_equal(path.numpy(), ref_path)
    assert logits.dtype == torch.float32
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("depth,t", [(0, 1), (3, 29), (6, 70)])
def test_fff_path_forward_matches_reference(backend, device, dtype, depth, t):
    d, o = 37, 26
    w_in, b_in = tree(depth, d, dtype, device, extra_level=True)
    w_out = rand(2 ** (depth + 1) - 1, o, dtype=dtype, device=device)
    x = separated_tokens(t, d, w_in, b_in, dtype, device)
    y = tritonlab.fff_path_forward(x, w_in, w_out, b_in, backend=backend)
    assert y.dtype == dtype and y.shape == (t, o)
    expected = ref.fff_path_forward_ref(np64(x), np64(w_in), np64(w_out), np64(b_in), "gelu")
    assert_close(y, expected, tolerance(dtype) + _logit_rounding_bound(x, w_in, w_out, b_in, expected))


_ACT64 = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
          "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"), None: lambda z: z}


@pytest.mark.parametrize("act,bias,t", [("relu", True, 37), ("gelu_tanh", False, 90), (None, True, 1)])
def test_fff_forward_backward(backend, device, act, bias, t):
    """Gradients of x, w1, b1, w2, b2 through the hard tree against float64 autograd through the
    leaf formula (the route from the reference); the node weights get none (the route has zero
    derivative). t = 90 runs the grouped path, 1 and 37 the decode sizes."""
    depth, d, h, o = 3, 14, 6, 9
    nw, nb = tree(depth, d, torch.float32, device)
    x = separated_tokens(t, d, nw, nb, torch.float32, device)
    leaf = torch.from_numpy(ref.tree_route_ref(np64(x), np64(nw), np64(nb))).to(device)
    w1, w2 = rand(2**depth, d, h, device=device), rand(2**depth, h, o, device=device)
    b1, b2 = (rand(2**depth, h, device=device), rand(2**depth, o, device=device)) if bias else (None, None)
    nw_grad = nw.clone().requires_grad_()

    def run(x_, w1_, b1_, w2_, b2_):
        return tritonlab.fff_forward(x_, nw_grad, nb, w1_, b1_, w2_, b2_, act, backend=backend)

    def formula(x_, w1_, b1_, w2_, b2_):
        u = torch.einsum("td,tdh->th", x_, w1_[leaf]) + (0 if b1_ is None else b1_[leaf])
        return torch.einsum("th,tho->to", _ACT64[act](u), w2_[leaf]) + (0 if b2_ is None else b2_[leaf])

    check_grads(run, formula, [x, w1, b1, w2, b2], rand(t, o, device=device))
    assert nw_grad.grad is None


def test_fff_forward_training_skips_the_index_check(backend, device, monkeypatch):
    """The training path's leaves come from the walk, in range by construction: it runs leaf_mlp
    without leaf_mlp's index range check (a host sync on CUDA). The public leaf_mlp still checks."""
    from tritonlab.kernels.grouped_gemm import ops as gg_ops

    def refuse(self, num_groups):
        raise AssertionError("index range check reached")

    depth, d, h, o, t = 3, 14, 6, 9, 90
    nw, nb = tree(depth, d, torch.float32, device)
    x = separated_tokens(t, d, nw, nb, torch.float32, device).requires_grad_()
    w1, w2 = rand(2**depth, d, h, device=device), rand(2**depth, h, o, device=device)
    expected = tritonlab.fff_forward(x.detach(), nw, nb, w1, None, w2, None, "relu", backend=backend)
    monkeypatch.setattr(gg_ops._IndexBounds, "check", refuse)
    y = tritonlab.fff_forward(x, nw, nb, w1, None, w2, None, "relu", backend=backend)
    y.sum().backward()
    assert x.grad is not None and torch.allclose(y.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="index range check"):
        tritonlab.leaf_mlp(x.detach(), torch.zeros(t, dtype=torch.int64, device=device), w1, None, w2, None, "relu",
                           backend=backend)


@pytest.mark.parametrize("act,bias,t", [("gelu", True, 41), ("relu", False, 1), ("silu", True, 70)])
def test_fff_path_forward_backward(backend, device, act, bias, t):
    """Gradients of x, w_in, w_out, b_in through the path logits against float64 autograd through
    the path formula (nodes from the reference walk), on both backends."""
    depth, d, o = 3, 16, 7
    w_in, b_in = tree(depth, d, torch.float32, device, extra_level=True)
    b_in = b_in if bias else None
    w_out = rand(w_in.shape[0], o, device=device)
    x = separated_tokens(t, d, w_in, b_in if bias else torch.zeros_like(w_in[:, 0]), torch.float32, device)
    nodes, _, _ = ref.tree_walk_ref(np64(x), np64(w_in), None if b_in is None else np64(b_in), depth + 1)
    nodes = torch.from_numpy(nodes).to(device)

    def formula(x_, wi_, wo_, bi_):
        logit = (x_[:, None, :] * wi_[nodes]).sum(-1) + (0 if bi_ is None else bi_[nodes])
        return (_ACT64[act](logit)[..., None] * wo_[nodes]).sum(1)

    check_grads(lambda x_, wi_, wo_, bi_: tritonlab.fff_path_forward(x_, wi_, wo_, bi_, act, backend=backend),
                formula, [x, w_in, w_out, b_in], rand(t, o, device=device))


def test_fff_path_forward_backward_follows_the_forward_path(backend, device):
    """Tokens on a node's hyperplane (root logit within rounding of 0), where two walks that sum in
    different orders may branch differently: the backward must differentiate the path the forward
    took. Without an activation y is linear in w_out along that path, so sum(y) = <dL/dw_out, w_out>
    for L = sum(y); a gradient taken along another path breaks the equality by order-1 terms (the
    Triton backward once re-walked the tree with the torch walk: 12 of 50 such tokens failed)."""
    depth, d, o, t = 3, 33, 4, 50
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    w_in = torch.randn(2 ** (depth + 1) - 1, d, generator=g)
    x = torch.randn(t, d, generator=g).double()
    x[:, 0] = -(x[:, 1:] @ w_in[0, 1:].double()) / w_in[0, 0].double()  # root logit ~ 0
    x, w_in = x.float().to(device), w_in.to(device)
    w_out = torch.randn(w_in.shape[0], o, generator=g).to(device).requires_grad_()
    y = tritonlab.fff_path_forward(x, w_in, w_out, None, None, backend=backend)
    y.sum().backward()
    assert torch.allclose(y.sum().double(), (w_out.grad.double() * w_out.detach().double()).sum(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("t", [1, 5])
def test_decode_tuning_space_covers_narrow_layers(device, t):
    """fff_decode's space has tile configs for D <= 16 and O <= 32 (it had none there, and nothing
    at all at T = 1), and they run right."""
    kernel = registered()["fff_decode"]
    shape = {"T": t, "D": 12, "H": 16, "O": 20, "depth": 3}
    tiles = [c for c in kernel.space(shape) if not c.get("GROUPED")]
    assert tiles
    inp = kernel.make_inputs(shape, torch.float32, device)
    for config in (tiles[0], tiles[-1]):
        assert kernel.error(inp, kernel.run(inp, config)) <= kernel.tolerance(torch.float32), config


def _logit_rounding_bound(x, w_in, w_out, b_in, expected) -> float:
    """Relative output error that float32 rounding of the path logits alone can cause.

    The output is linear in act(logit), so a logit near 0 (a token close to a node's hyperplane)
    amplifies its rounding: |d logit| <= D * 2**-24 * sum_i |x_i w_i| (the dot-product bound), and
    |gelu'| <= 1.13. Added to the dtype tolerance so that a single ill-conditioned token does not
    fail a correct kernel, while a wrong node or a wrong sum (errors of order 1) still fails.
    """
    xs, wi, wo = np64(x), np64(w_in), np64(w_out)
    nodes, _, _ = ref.tree_walk_ref(xs, wi, np64(b_in), wi.shape[0].bit_length())
    d = xs.shape[1]
    per_node = 1.13 * d * 2.0**-24 * np.einsum("td,tld->tl", np.abs(xs), np.abs(wi[nodes]))
    per_token = (per_node * np.linalg.norm(wo[nodes], axis=2)).sum(1)
    return float(np.linalg.norm(per_token) / max(np.linalg.norm(expected), 1e-300))


def test_empty_batches(backend, device):
    nw, nb = tree(2, 10, torch.float32, device)
    w1, b1, w2, b2 = rand(4, 10, 3, device=device), rand(4, 3, device=device), rand(4, 3, 5, device=device), rand(4, 5, device=device)
    y = tritonlab.fff_forward(rand(0, 10, device=device), nw, nb, w1, b1, w2, b2, backend=backend)
    assert y.shape == (0, 5)
    y, counts = tritonlab.fff_forward(rand(2, 0, 10, device=device), nw, nb, w1, b1, w2, b2, return_leaf_counts=True, backend=backend)
    assert y.shape == (2, 0, 5) and counts.sum() == 0
    w_in, _ = tree(2, 10, torch.float32, device, extra_level=True)
    assert tritonlab.fff_path_forward(rand(0, 10, device=device), w_in, rand(7, 4, device=device), backend=backend).shape == (0, 4)
    # a training step on an empty batch: zero gradients, no error in backward (the README's promise)
    x = rand(3, 0, 10, device=device).requires_grad_()
    params = [t.clone().requires_grad_() for t in (w1, b1, w2, b2, w_in)]
    w_out = rand(7, 4, device=device).requires_grad_()
    loss = (tritonlab.fff_forward(x, nw, nb, *params[:4], backend=backend).sum()
            + tritonlab.fff_path_forward(x, params[4], w_out, backend=backend).sum())
    loss.backward()
    for t in [x, w_out] + params:
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.abs().sum()
    layer = tritonlab.FastFeedForward(10, 3, 5, 2, backend=backend).to(device).eval()
    layer(x).sum().backward()
    assert layer.w1.grad is not None and not layer.w1.grad.abs().sum()


def _bad_calls():
    x, nw, nb = rand(5, 8), rand(7, 8), rand(7)
    w1, b1, w2, b2 = rand(8, 8, 4), rand(8, 4), rand(8, 4, 6), rand(8, 6)
    f = tritonlab.fff_forward
    return [
        ("node_weight", ValueError, lambda: tritonlab.tree_route(x, rand(6, 8))),
        ("node_weight", ValueError, lambda: tritonlab.tree_route(x, rand(7, 9))),
        ("node_bias", ValueError, lambda: tritonlab.tree_route(x, nw, rand(6))),
        ("x", TypeError, lambda: tritonlab.tree_route(x.to(torch.int64), nw)),
        ("x", TypeError, lambda: tritonlab.tree_route(x.to(torch.complex64), nw)),
        ("node_weight", TypeError, lambda: tritonlab.tree_route(x, nw.double())),
        ("node_weight", ValueError, lambda: tritonlab.tree_route(x, nw.to("meta"))),
        ("backend", ValueError, lambda: tritonlab.tree_route(x, nw, backend="cuda")),
        # a bad backend name also when nothing would run: no tokens, or a depth-0 tree
        ("backend", ValueError, lambda: tritonlab.tree_route(x[:0], nw, backend="cuda")),
        ("backend", ValueError, lambda: tritonlab.tree_route(x, rand(0, 8), backend="cuda")),
        ("backend", ValueError, lambda: f(x[:0], nw, nb, w1, b1, w2, b2, backend="cuda")),
        ("backend", ValueError, lambda: tritonlab.fff_path_forward(x[:0], nw, rand(7, 3), backend="cuda")),
        ("w1", ValueError, lambda: f(x, nw, nb, rand(4, 8, 4), b1, w2, b2)),
        ("w1", ValueError, lambda: f(x, nw, nb, rand(8, 7, 4), b1, w2, b2)),
        ("w2", ValueError, lambda: f(x, nw, nb, w1, b1, rand(8, 5, 6), b2)),
        ("w2", ValueError, lambda: f(x, nw, nb, w1, b1, rand(16, 4, 6), b2)),
        ("b1", ValueError, lambda: f(x, nw, nb, w1, rand(8, 5), w2, b2)),
        ("b2", ValueError, lambda: f(x, nw, nb, w1, b1, w2, rand(8, 7))),
        ("w1", TypeError, lambda: f(x, nw, nb, w1.to(torch.int32), b1, w2, b2)),
        ("activation", ValueError, lambda: f(x, nw, nb, w1, b1, w2, b2, "tanh")),
        ("w2", ValueError, lambda: f(x, nw, nb, w1, b1, w2.to("meta"), b2)),
        ("w_in", ValueError, lambda: tritonlab.fff_path_forward(x, rand(6, 8), rand(6, 3))),
        ("w_out", ValueError, lambda: tritonlab.fff_path_forward(x, nw, rand(3, 3))),
        # zero widths and a 0-d x
        ("x", ValueError, lambda: tritonlab.tree_route(torch.tensor(1.0), nw)),
        ("x", ValueError, lambda: f(torch.tensor(1.0), nw, nb, w1, b1, w2, b2)),
        ("x", ValueError, lambda: tritonlab.tree_route(rand(5, 0), rand(7, 0))),
        ("w1", ValueError, lambda: f(x, nw, nb, rand(8, 8, 0), None, rand(8, 0, 6), b2)),
        ("w2", ValueError, lambda: f(x, nw, nb, w1, b1, rand(8, 4, 0), None)),
        ("w_in", ValueError, lambda: tritonlab.fff_path_forward(x, rand(0, 8), rand(0, 3))),
        ("w_out", ValueError, lambda: tritonlab.fff_path_forward(x, nw, rand(7, 0))),
        ("return_leaf_counts", TypeError, lambda: f(x, nw, nb, w1, b1, w2, b2, return_leaf_counts="no")),
    ]


@pytest.mark.parametrize("name,exc,call", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_inputs_raise_clear_errors(name, exc, call):
    with pytest.raises(exc, match=name):
        call()


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        tritonlab.tree_route(rand(3, 8), rand(7, 8), backend="triton")


def test_env_backend_switch(monkeypatch, device):
    nw, nb = tree(3, 12, torch.float32, device)
    x = separated_tokens(9, 12, nw, nb, torch.float32, device)
    expected = ref.tree_route_ref(np64(x), np64(nw), np64(nb))
    for value in ("torch", "triton"):
        monkeypatch.setenv("TRITONLAB_BACKEND", value)
        np.testing.assert_array_equal(tritonlab.tree_route(x, nw, nb).cpu().numpy(), expected)
    monkeypatch.setenv("TRITONLAB_BACKEND", "fastest")
    with pytest.raises(ValueError, match="TRITONLAB_BACKEND"):
        tritonlab.tree_route(x, nw, nb)


def test_ops_hold_in_a_compiled_graph(device):
    """torch.compile(fullgraph=True) traces through the custom ops (fake impls give the shapes)."""
    depth, d, h, o = 3, 16, 8, 10
    nw, nb = tree(depth, d, torch.float32, device)
    w1, b1, w2, b2 = rand(8, d, h, device=device), rand(8, h, device=device), rand(8, h, o, device=device), rand(8, o, device=device)
    w_in, _ = tree(depth, d, torch.float32, device, extra_level=True)
    w_out = rand(15, o, device=device)

    def layer(x):
        return (tritonlab.fff_forward(x, nw, nb, w1, b1, w2, b2, "relu", backend="torch")
                + tritonlab.fff_path_forward(x, w_in, w_out, backend="torch"),
                tritonlab.tree_route(x, nw, nb, backend="torch"))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = separated_tokens(11, d, nw, nb, torch.float32, device)
    y, leaf = compiled(x)
    y_eager, leaf_eager = layer(x)
    torch.testing.assert_close(y, y_eager)
    assert torch.equal(leaf, leaf_eager)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("t", [65, 16384])
def test_gpu_fff_forward_large_batch_in_a_cuda_graph(t):
    """The grouped large-T path (leaf counts from the walk, counting-sort grouping, fused leaves) on
    the headline shape: right against float64 on sampled rows, and captured in a CUDA graph it
    replays the eager result bit for bit (rows land in atomics order; each row's math is the same)."""
    d, depth, h = 768, 8, 16
    nw, nb = tree(depth, d, torch.bfloat16, "cuda")
    x = separated_tokens(t, d, nw, nb, torch.bfloat16, "cuda")
    w1, w2 = rand(2**depth, d, h, dtype=torch.bfloat16, device="cuda", scale=d**-0.5), rand(2**depth, h, d, dtype=torch.bfloat16, device="cuda", scale=h**-0.5)
    b1, b2 = rand(2**depth, h, dtype=torch.bfloat16, device="cuda"), rand(2**depth, d, dtype=torch.bfloat16, device="cuda")
    call = lambda: tritonlab.fff_forward(x, nw, nb, w1, b1, w2, b2, "relu", backend="triton")
    y = call()
    rows = torch.arange(0, t, max(1, t // 200), device="cuda")
    expected = ref.fff_forward_ref(*(np64(a) for a in (x[rows], nw, nb, w1, b1, w2, b2)), "relu")
    assert_close(y[rows], expected, tolerance(torch.bfloat16))
    replay = graph_replay(call)
    assert torch.equal(replay(), y) and torch.equal(replay(), y)


def test_route_space_is_pruned_to_the_gpu_shared_memory():
    """tree_route's shared-memory estimate lets the tuner drop what cannot launch: on sm_90 (227 KB a
    block), 6 dense levels with x resident (BLOCK_D=1024 at D=768) need 288 KB; 5 levels fit."""
    from tritonlab.autotune.tuner import prune
    from tritonlab.kernels import _backend

    kernel = registered()["tree_route"]
    shape = {"T": 16384, "D": 768, "depth": 8}
    space = kernel.space(shape)
    too_big = {"BLOCK_T": 16, "BLOCK_D": 1024, "DENSE_LEVELS": 6, "num_warps": 8}
    fits = dict(too_big, DENSE_LEVELS=5)
    assert too_big in space and fits in space
    _backend.set_compile_target(_backend.CompileTarget(90, 232448))
    try:
        kept, why = prune(kernel, shape, space, torch.bfloat16, torch.device("cpu"))
    finally:
        _backend.set_compile_target(None)
    assert too_big not in kept and fits in kept
    assert any("shared memory" in reason for reason in why.values())
    assert kernel.default(shape) in kept


def test_walk_config_fits_the_gpu_shared_memory(monkeypatch, device):
    """The resident fp32 default needs 192 KB of shared memory at D=768: on a GPU with less (A100:
    163 KB a block) the launcher streams x in 128-wide chunks instead, and still routes exactly."""
    from tritonlab.kernels import _backend
    from tritonlab.kernels.tree_routing import ops

    default = registered()["tree_route"].default({"T": 300, "D": 768, "depth": 5})
    assert default["BLOCK_D"] == 1024 and ops._route_smem({"D": 768}, default, torch.float32) == 196608
    fitted = ops._fit_shared_memory(default, 768, torch.float32, 166912)
    assert fitted == dict(default, BLOCK_D=128) and ops._route_smem({"D": 768}, fitted, torch.float32) <= 166912
    assert ops._fit_shared_memory(default, 768, torch.float32, None) == default
    assert ops._fit_shared_memory(default, 768, torch.bfloat16, 166912) == default  # 96 KB fits
    tiny = ops._fit_shared_memory(default, 768, torch.float32, 8192)  # fewer dense levels as a last resort
    assert tiny["DENSE_LEVELS"] < default["DENSE_LEVELS"] and ops._route_smem({"D": 768}, tiny, torch.float32) <= 8192

    launched = record_launches(monkeypatch, ops, "tree_walk_kernel", "BLOCK_D")
    monkeypatch.setattr(_backend, "shared_memory_per_block", lambda dev: 166912)
    monkeypatch.setattr(ops, "shared_memory_per_block", lambda dev: 166912)
    nw, nb = tree(5, 768, torch.float32, device)
    x = separated_tokens(300, 768, nw, nb, torch.float32, device)
    leaf = tritonlab.tree_route(x, nw, nb, backend="triton")
    assert launched == [(128,)]
    np.testing.assert_array_equal(leaf.cpu().numpy(), ref.tree_route_ref(np64(x), np64(nw), np64(nb)))
