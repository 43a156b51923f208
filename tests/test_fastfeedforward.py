"""FastFeedForward: soft training, hard inference through the kernels, master leaf, import from fastfeedforward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tritonlab
from tritonlab.kernels.tree_routing import reference as ref

from helpers import assert_close, np64, rand, tolerance
from test_tree_routing import separated_tokens


def _module(device, **kw):
    m = tritonlab.FastFeedForward(24, 7, 10, 4, "gelu", **kw).to(device)
    with torch.no_grad():  # spread the biases so routing uses the whole tree
        m.node_bias.normal_(0, 0.3)
    return m


def test_eval_runs_the_hard_tree(backend, device):
    m = _module(device, backend=backend).eval()
    x = separated_tokens(33, 24, m.node_weight.detach(), m.node_bias.detach(), torch.float32, device)
    y, counts = m(x.reshape(3, 11, 24), return_leaf_counts=True)
    expected = ref.fff_forward_ref(*(np64(t.detach()) for t in (x, m.node_weight, m.node_bias, m.w1, m.b1, m.w2, m.b2)), "gelu")
    assert y.shape == (3, 11, 10)
    assert_close(y.reshape(33, 10), expected, tolerance(torch.float32))
    assert counts.sum() == 33 and counts.shape == (16,)


def test_hardened_training_forward_equals_inference(device):
    m = _module(device, train_hardened=True)
    x = separated_tokens(40, 24, m.node_weight.detach(), m.node_bias.detach(), torch.float32, device)
    y_train = m.train()(x)
    with torch.no_grad():
        y_eval = m.eval()(x)
    assert_close(y_eval, y_train.detach(), 1e-5)


def test_hardened_training_sends_a_zero_logit_right_as_inference_does(device):
    """At logit 0 the hard route goes right (>= 0); hardened training must too (round(sigmoid(0)) =
    round(0.5) went left). The root is zeroed, so every token's first logit is exactly 0."""
    m = _module(device, train_hardened=True)
    with torch.no_grad():
        m.node_bias[0] = 1e3  # tokens separated on the right subtree, the path they will take
        x = separated_tokens(20, 24, m.node_weight.detach(), m.node_bias.detach(), torch.float32, device)
        m.node_weight[0] = 0.0
        m.node_bias[0] = 0.0
        y_eval, counts = m.eval()(x, return_leaf_counts=True)
    assert counts[8:].sum() == 20  # all in the right half of the 16 leaves
    assert_close(m.train()(x).detach(), y_eval, 1e-5)


def test_soft_training_is_a_mixture_and_trains(device):
    m = _module(device).train()
    x = rand(17, 24, device=device)
    mix = m.leaf_mixture(x)
    torch.testing.assert_close(mix.sum(1), torch.ones(17, device=device))
    assert (mix > 0).all()
    y = m(x)
    y.square().mean().backward()
    for p in (m.node_weight, m.node_bias, m.w1, m.b1, m.w2, m.b2):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_master_leaf_is_added_to_every_token(device):
    m = _module(device, master_leaf_width=5).eval()
    x = separated_tokens(9, 24, m.node_weight.detach(), m.node_bias.detach(), torch.float32, device)
    with torch.no_grad():
        y = m(x)
        routed = tritonlab.fff_forward(x, m.node_weight, m.node_bias, m.w1, m.b1, m.w2, m.b2, "gelu")
        torch.testing.assert_close(y, routed + m.master(x))


def test_from_fastfeedforward_matches_its_hard_forward(device):
    fff_pkg = pytest.importorskip("fastfeedforward")
    theirs = fff_pkg.FFF(20, 6, 9, 5, activation=torch.nn.ReLU()).to(device).eval()
    mine = tritonlab.FastFeedForward.from_fastfeedforward(theirs).eval()
    x = separated_tokens(50, 20, theirs.node_weights.detach(), theirs.node_biases.detach().reshape(-1), torch.float32, device)
    with torch.no_grad():
        expected = theirs.training_forward(x, use_hard_decisions=True)
        y = mine(x)
    assert_close(y, expected, 1e-5)
    # their eval_forward drops b2s; the difference is exactly each token's b2 of its leaf
    leaf = tritonlab.tree_route(x, mine.node_weight.detach(), mine.node_bias.detach()).long()
    with torch.no_grad():
        torch.testing.assert_close(y - theirs.eval_forward(x), mine.b2[leaf], rtol=1e-4, atol=1e-5)


def test_from_fastfeedforward_keeps_training_settings(device):
    """train_hardened, dropout and the train/eval mode carry over: a hardened module in training
    mode gives their hardened training output; region_leak, which has no equivalent, warns."""
    fff_pkg = pytest.importorskip("fastfeedforward")
    theirs = fff_pkg.FFF(13, 5, 7, 4, activation=torch.nn.ReLU(), train_hardened=True).to(device).train()
    mine = tritonlab.FastFeedForward.from_fastfeedforward(theirs)
    assert mine.training and mine.train_hardened
    x = separated_tokens(33, 13, theirs.node_weights.detach(), theirs.node_biases.detach().reshape(-1), torch.float32, device)
    assert_close(mine(x), theirs(x), 1e-5)
    leaky = fff_pkg.FFF(13, 5, 7, 2, dropout=0.25, region_leak=0.1).eval()
    with pytest.warns(UserWarning, match="region_leak"):
        copied = tritonlab.FastFeedForward.from_fastfeedforward(leaky)
    assert not copied.training and copied.dropout.p == 0.25 and not copied.train_hardened


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="depth"):
        tritonlab.FastFeedForward(8, 4, 8, -1)
    with pytest.raises(ValueError, match="activation"):
        tritonlab.FastFeedForward(8, 4, 8, 2, "tanh")
    with pytest.raises(ValueError, match="leaf_width"):
        tritonlab.FastFeedForward(8, 0, 8, 2)
    with pytest.raises(TypeError, match="depth"):
        tritonlab.FastFeedForward(8, 4, 8, 2.0)
    with pytest.raises(ValueError, match="backend"):
        tritonlab.FastFeedForward(8, 4, 8, 2, backend="gpu")
    m = tritonlab.FastFeedForward(8, 4, 6, 2)
    for training in (True, False):  # the soft tree (training) checks its input as the kernels do
        m.train(training)
        for exc, bad in ((ValueError, torch.randn(3, 7)), (ValueError, torch.tensor(1.0)),
                         (TypeError, torch.ones(3, 8, dtype=torch.int64)), (TypeError, [[0.0] * 8]),
                         (ValueError, torch.randn(3, 8, device="meta"))):
            with pytest.raises(exc, match="x"):
                m(bad)
        with pytest.raises(TypeError, match="return_leaf_counts"):
            m(torch.randn(3, 8), return_leaf_counts="no")


def test_bfloat16_input_in_both_modes():
    """A bf16 x through float32 parameters (with a master leaf): bf16 out in training (the soft tree
    in float32) and in eval (the kernels in bf16), close to the float32 result."""
    m = tritonlab.FastFeedForward(8, 4, 6, 2, master_leaf_width=5, backend="torch")
    # eval routes with the tree cast to bf16: a token within that rounding of a node's hyperplane
    # may take the other child than in float32 (an order-1 difference; 0.7% of draws had one), so
    # the tokens are drawn separated on both trees, taking the same leaf in each
    w, b = m.node_weight.detach(), m.node_bias.detach()
    trees = [(np64(w), np64(b)), (np64(w.bfloat16()), np64(b.bfloat16()))]
    kept = []
    while sum(k.shape[0] for k in kept) < 10:
        cand = torch.randn(40, 8)
        xb = np64(cand.bfloat16())
        ok = np.all([ref.route_margin_ref(xb, *t) >= 1e-3 for t in trees], axis=0)
        ok &= ref.tree_route_ref(xb, *trees[0]) == ref.tree_route_ref(xb, *trees[1])
        kept.append(cand[torch.from_numpy(ok)])
    x = torch.cat(kept)[:10]
    for training in (True, False):
        m.train(training)
        y16, y32 = m(x.bfloat16()), m(x.bfloat16().float())
        assert y16.dtype == torch.bfloat16
        assert (y16.float() - y32).norm() <= 2e-2 * y32.norm()


def test_repr_names_the_shape():
    text = repr(tritonlab.FastFeedForward(24, 7, 10, 4, "gelu", train_hardened=True))
    assert "input_width=24, leaf_width=7, output_width=10, depth=4, activation='gelu', train_hardened=True" in text
