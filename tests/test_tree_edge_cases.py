"""Edge cases of the tree-routing family found by fuzzing it as an FFF / UltraFastBERT user would call it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tritonlab
from tritonlab.kernels.tree_routing import reference as ref

from helpers import assert_close, np64, rand, tolerance
from test_tree_routing import separated_tokens, tree


def test_ops_and_module_run_on_the_meta_device(backend):
    """Meta tensors (shape inference, a model built on the meta device) hold no data: every op gives
    its output shapes, forward and backward, on both backends. backend="triton" under the
    interpreter launched the kernels on them ("Cannot copy out of meta tensor"), and the module's
    training-mode leaf counts used torch.bincount, which has no meta kernel."""
    meta = torch.device("meta")
    d, h, o, depth = 8, 4, 6, 3
    n = 2**depth
    x = rand(2, 35, d).to(meta)
    nw, nb = rand(n - 1, d).to(meta), rand(n - 1).to(meta)
    w1, b1, w2, b2 = (rand(*s).to(meta) for s in ((n, d, h), (n, h), (n, h, o), (n, o)))
    leaf = tritonlab.tree_route(x, nw, nb, backend=backend)
    assert leaf.shape == (2, 35) and leaf.is_meta and leaf.dtype == torch.int32
    for t in (3, 70):  # the decode-size kernel and the grouped path
        xt = rand(t, d).to(meta)
        y, counts = tritonlab.fff_forward(xt, nw, nb, w1, b1, w2, b2, "gelu", return_leaf_counts=True, backend=backend)
        assert y.shape == (t, o) and y.is_meta and counts.shape == (n,)
        w_in, w_out = rand(2 * n - 1, d).to(meta), rand(2 * n - 1, o).to(meta)
        assert tritonlab.fff_path_forward(xt, w_in, w_out, None, "relu", backend=backend).shape == (t, o)
    xg = rand(5, d).to(meta).requires_grad_()
    w1g = w1.clone().requires_grad_()
    tritonlab.fff_forward(xg, nw, nb, w1g, b1, w2, b2, backend=backend).sum().backward()
    assert xg.grad.shape == xg.shape and w1g.grad.shape == w1.shape
    layer = tritonlab.FastFeedForward(d, h, o, depth, master_leaf_width=3, backend=backend).to(meta)
    for training in (True, False):
        y, counts = layer.train(training)(x, return_leaf_counts=True)
        assert y.shape == (2, 35, o) and y.is_meta and counts.shape == (n,) and counts.dtype == torch.int64
        y.sum().backward()
        assert layer.w2.grad.shape == layer.w2.shape and layer.w2.grad.is_meta


def test_trainable_tree_with_frozen_leaves_compiles(backend):
    """fff_forward gives the node parameters no gradient (the hard route is piecewise constant).
    When they are the only inputs that require one (frozen leaves; in eval mode the trainable master
    leaf beside them), torch.compile traced the custom op's backward, which it does not have:
    "Trying to backward through tritonlab.fff_forward.default but no autograd formula was registered".
    Compiled, the loss must train the master leaf as eager does and leave the tree without a gradient."""
    layer = tritonlab.FastFeedForward(12, 5, 7, 3, "relu", master_leaf_width=4, backend=backend).eval()
    for p in (layer.w1, layer.b1, layer.w2, layer.b2):
        p.requires_grad_(False)
    x = separated_tokens(9, 12, layer.node_weight.detach(), layer.node_bias.detach(), torch.float32, "cpu")
    dy = rand(9, 7)
    (layer(x) * dy).sum().backward()
    eager = layer.master[0].weight.grad.clone()
    layer.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    (compiled(x) * dy).sum().backward()
    assert layer.node_weight.grad is None and layer.node_bias.grad is None
    assert_close(layer.master[0].weight.grad, eager.double().numpy(), tolerance(torch.float32))


def test_from_fastfeedforward_rejects_other_modules():
    """A module that is not an FFF gets a TypeError naming `module` (was an AttributeError about
    `activation`, from inside the conversion)."""
    with pytest.raises(TypeError, match="module must be a fastfeedforward.FFF.*Linear"):
        tritonlab.FastFeedForward.from_fastfeedforward(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="module must be a fastfeedforward.FFF.*NoneType"):
        tritonlab.FastFeedForward.from_fastfeedforward(None)


def test_from_fastfeedforward_rejects_a_malformed_tree():
    """A module whose node count is not 2**depth - 1 gets a ValueError naming node_weights (it
    failed inside a copy_ with a size mismatch)."""
    fff_pkg = pytest.importorskip("fastfeedforward")
    theirs = fff_pkg.FFF(10, 4, 6, 2)
    theirs.node_weights = torch.nn.Parameter(torch.randn(int(torch.randint(4, 7, ())), 10))
    with pytest.raises(ValueError, match="node_weights must have 2\\*\\*depth - 1 rows"):
        tritonlab.FastFeedForward.from_fastfeedforward(theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_fastfeedforward_keeps_dtype(dtype):
    """The copy keeps the FFF's dtype as it keeps its device (a bf16 FFF became a float32 layer, twice
    its memory, training in another precision than the original), and its values exactly."""
    fff_pkg = pytest.importorskip("fastfeedforward")
    theirs = fff_pkg.FFF(10, 4, 6, 3).to(dtype).eval()
    mine = tritonlab.FastFeedForward.from_fastfeedforward(theirs)
    for a, b in ((mine.node_weight, theirs.node_weights), (mine.node_bias, theirs.node_biases.reshape(-1)),
                 (mine.w1, theirs.w1s), (mine.b1, theirs.b1s), (mine.w2, theirs.w2s), (mine.b2, theirs.b2s)):
        assert a.dtype == dtype and torch.equal(a, b)
    x = rand(5, 10, dtype=dtype)
    with torch.no_grad():
        y = mine(x)
    assert y.dtype == dtype and y.shape == (5, 6)
    f64 = tritonlab.FastFeedForward.from_fastfeedforward(fff_pkg.FFF(10, 4, 6, 3).double())
    assert f64.w1.dtype == torch.float32  # the kernels have no float64: the nearest dtype they take


def test_from_fastfeedforward_on_the_meta_device():
    """An FFF built on the meta device (deferred init) converts to a layer there; the conversion read
    its depth with .item() and copied out of its meta tensors, and failed."""
    fff_pkg = pytest.importorskip("fastfeedforward")
    theirs = fff_pkg.FFF(10, 4, 6, 3).to("meta")
    mine = tritonlab.FastFeedForward.from_fastfeedforward(theirs)
    assert mine.depth == 3 and mine.w1.is_meta and mine.w1.shape == (8, 10, 4)
    assert mine.eval()(torch.empty(2, 7, 10, device="meta")).shape == (2, 7, 6)


def test_module_depth_beyond_the_kernels_is_a_clear_error():
    """The kernels take depth <= 24: a deeper layer was allocated (2**40 rows: an allocator failure
    naming no argument; depth 25: gigabytes, then a failure at its first eval call)."""
    for depth in (25, 40):
        with pytest.raises(ValueError, match="depth"):
            tritonlab.FastFeedForward(4, 1, 1, depth)
    assert tritonlab.FastFeedForward(2, 1, 1, 12).w1.shape == (4096, 2, 1)


# ----------------------------------------------------------------------------- properties that held

@pytest.mark.parametrize("t", [5, 70])
def test_strided_expanded_and_transposed_arguments(backend, t):
    """Non-contiguous tokens (transposed, column-strided, with leading dims) and weights (transposed,
    expanded, strided biases) give the reference's results on both backends."""
    d, h, o, depth = 12, 5, 7, 3
    n = 2**depth
    nw = rand(d, n - 1).t()  # transposed
    nb = rand(2 * (n - 1), scale=0.3)[::2]  # strided
    x = separated_tokens(t, d, nw, nb, torch.float32, "cpu")
    xs = torch.cat([x, rand(t, d)], 1)[:, :d].reshape(1, t, d)  # column-strided, a leading dim
    w1 = rand(n, h, d).transpose(1, 2)
    b1 = rand(1, h).expand(n, h)
    w2 = rand(1, h, o).expand(n, h, o)
    b2 = rand(n, 2 * o)[:, ::2]
    leaf = tritonlab.tree_route(xs, nw, nb, backend=backend)
    np.testing.assert_array_equal(leaf.reshape(-1).numpy(), ref.tree_route_ref(np64(x), np64(nw), np64(nb)))
    y = tritonlab.fff_forward(xs, nw, nb, w1, b1, w2, b2, "silu", backend=backend)
    assert_close(y.reshape(t, o), ref.fff_forward_ref(*(np64(a) for a in (x, nw, nb, w1, b1, w2, b2)), "silu"),
                 tolerance(torch.float32))
    w_in = rand(d, 2 * n - 1).t()
    w_out = rand(1, o).expand(2 * n - 1, o)
    xp = separated_tokens(t, d, w_in, None, torch.float32, "cpu")
    yp = tritonlab.fff_path_forward(xp.t().contiguous().t(), w_in, w_out, None, "relu", backend=backend)
    assert_close(yp, ref.fff_path_forward_ref(np64(xp), np64(w_in), np64(w_out), None, "relu"), tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [3, 70, 300])  # decode kernel, grouped path, dense top levels of the walk
def test_exact_zero_logits_go_right(backend, dtype, t):
    """A token on every node's hyperplane (x = 0, zero biases: every logit exactly 0, of either sign
    of zero) goes right at every node, to the last leaf, in every op and at every batch size."""
    d, depth = 9, 4
    n = 2**depth
    nw = rand(n - 1, d, dtype=dtype)
    x = torch.zeros(t, d, dtype=dtype)
    x[::2] = -0.0
    for nb in (None, torch.zeros(n - 1, dtype=dtype), -torch.zeros(n - 1, dtype=dtype)):
        assert (tritonlab.tree_route(x, nw, nb, backend=backend) == n - 1).all()
        if t > 70:  # fff_forward routes 300 tokens as it does 70 (the grouped path), only slower interpreted
            continue
        w1, w2 = rand(n, d, 3, dtype=dtype), rand(n, 3, 2, dtype=dtype)
        _, counts = tritonlab.fff_forward(x, nw, nb, w1, None, w2, None, return_leaf_counts=True, backend=backend)
        assert counts[-1] == t and counts.sum() == t
    # fff_path_forward: the path it took (its op's second output) is the right-most one, nodes 0, 2, 6, ...
    from tritonlab.kernels.tree_routing.ops import _fff_path_forward_impl
    w_in, w_out = rand(2 * n - 1, d, dtype=dtype), rand(2 * n - 1, 3, dtype=dtype)
    y, nodes = _fff_path_forward_impl(x, w_in, w_out, torch.zeros(2 * n - 1, dtype=dtype), "gelu", backend)
    assert nodes.tolist() == [[2**k - 2 for k in range(1, depth + 2)]] * t
    assert (y == 0).all()  # act(0) = 0 at every node


@pytest.mark.parametrize("t", [3, 70])
def test_non_finite_node_rows_off_the_path_do_not_leak(backend, t):
    """NaN in a node row or leaf that a token does not visit leaves that token's output as the
    reference gives it (no NaN leaks across tokens or through masked tiles); a NaN logit goes left."""
    d, h, o, depth = 10, 4, 5, 3
    n = 2**depth
    nw, nb = tree(depth, d, torch.float32, "cpu")
    x = separated_tokens(t, d, nw, nb, torch.float32, "cpu")
    nw[n - 2] = float("nan")  # the last node of the last level: its tokens go left, to leaf n - 2
    w1, w2 = rand(n, d, h), rand(n, h, o)
    w1[n - 1] = float("nan")  # the leaf no token can reach now
    leaf = tritonlab.tree_route(x, nw, nb, backend=backend)
    np.testing.assert_array_equal(leaf.numpy(), ref.tree_route_ref(np64(x), np64(nw), np64(nb)))
    assert (leaf != n - 1).all()
    y = tritonlab.fff_forward(x, nw, nb, w1, None, w2, None, "relu", backend=backend)
    assert torch.isfinite(y).all()
    assert_close(y, ref.fff_forward_ref(np64(x), np64(nw), np64(nb), np64(w1), None, np64(w2), None, "relu"),
                 tolerance(torch.float32))
