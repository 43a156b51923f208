"""FastFeedForward: soft training, hard inference through the kernels, master leaf, import from fastfeedforward."""
from __future__ import annotations

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


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="depth"):
        tritonlab.FastFeedForward(8, 4, 8, -1)
    with pytest.raises(ValueError, match="activation"):
        tritonlab.FastFeedForward(8, 4, 8, 2, "tanh")
    with pytest.raises(ValueError, match="leaf_width"):
        tritonlab.FastFeedForward(8, 0, 8, 2)
