"""Edge cases of the nn.Module layer: LeafMLP, QuantizedFFN and FFTTokenMixer (construction checks,
float64 references through the modules, state_dict, precision of module-wide casts, compile)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import tritonlab
from tritonlab.kernels._backend import torch_activation
from tritonlab.kernels.fft_mixing import FFTTokenMixer

from helpers import assert_close, rand, tolerance
from test_fft_mixing import _module_reference

# ----------------------------------------------------------------------------- LeafMLP


def _leaf_formula(x, idx, w1, b1, w2, b2, act, rw):
    """sum_j rw[t, j] * (act(x @ w1[g] + b1[g]) @ w2[g] + b2[g]) in torch (float64 in the tests)."""
    u = torch.einsum("td,tkdn->tkn", x, w1[idx]) + (0 if b1 is None else b1[idx])
    if act == "swiglu":
        h = u.shape[-1] // 2
        a = torch.nn.functional.silu(u[..., :h]) * u[..., h:]
    else:
        a = torch_activation(u, act)
    v = torch.einsum("tkh,tkho->tko", a, w2[idx]) + (0 if b2 is None else b2[idx])
    return ((1 if rw is None else rw[..., None]) * v).sum(1)


@pytest.mark.parametrize("name,exc,call", [
    ("num_groups", TypeError, lambda: tritonlab.LeafMLP(2.5, 4, 4)),
    ("num_groups", TypeError, lambda: tritonlab.LeafMLP("3", 4, 4)),
    ("input_width", TypeError, lambda: tritonlab.LeafMLP(2, True, 4)),
    ("hidden_width", TypeError, lambda: tritonlab.LeafMLP(2, 4, None)),
    ("output_width", TypeError, lambda: tritonlab.LeafMLP(2, 4, 4, 6.0)),
    ("hidden_width", ValueError, lambda: tritonlab.LeafMLP(2, 4, 0)),
    ("dtype", TypeError, lambda: tritonlab.LeafMLP(2, 4, 4, dtype=torch.float64)),  # leaf_mlp refuses float64 x
    ("dtype", TypeError, lambda: tritonlab.LeafMLP(2, 4, 4, dtype=torch.int32)),
    ("activation", ValueError, lambda: tritonlab.LeafMLP(2, 4, 4, activation=nn.GELU())),
], ids=lambda v: v if isinstance(v, str) else "")
def test_leaf_mlp_construction_errors_name_the_argument(name, exc, call):
    with pytest.raises(exc, match=name):
        call()


def test_leaf_mlp_accepts_numpy_integer_sizes():
    layer = tritonlab.LeafMLP(np.int64(3), np.int32(5), np.int64(4), backend="torch")
    assert layer.w1.shape == (3, 5, 4) and isinstance(layer.num_groups, int)
    assert layer(rand(2, 5), torch.tensor([0, 2])).shape == (2, 5)


@pytest.mark.parametrize("act,bias", [("swiglu", True), ("gelu_tanh", False)])
def test_leaf_mlp_module_forward_and_grads_match_float64(backend, device, act, bias):
    """Leading dims, k = 2, odd T: output and the gradients of x, route weights and every
    parameter against float64 autograd of the formula."""
    g, d, h, o = 4, 9, 5, 7
    layer = tritonlab.LeafMLP(g, d, h, o, act, bias=bias, backend=backend, device=device)
    assert [n for n, _ in layer.named_parameters()] == (["w1", "w2", "b1", "b2"] if bias else ["w1", "w2"])
    assert all(p.requires_grad for p in layer.parameters())
    x = rand(3, 5, d, device=device).requires_grad_()
    idx = torch.randint(0, g, (3, 5, 2), device=device)
    rw = torch.rand(3, 5, 2, device=device).requires_grad_()
    y = layer(x, idx, rw)
    assert y.shape == (3, 5, o)
    dy = rand(3, 5, o, device=device)
    y.backward(dy)
    params = [layer.w1, layer.b1, layer.w2, layer.b2]
    p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
    x64, rw64 = x.detach().double().requires_grad_(), rw.detach().double().requires_grad_()
    y64 = _leaf_formula(x64.reshape(15, d), idx.reshape(15, 2), *p64, act, rw64.reshape(15, 2)).reshape(3, 5, o)
    y64.backward(dy.double())
    tol = 2 * tolerance(torch.float32)
    assert_close(y, y64, tol, "forward")
    assert_close(x.grad, x64.grad, tol, "dx")
    assert_close(rw.grad, rw64.grad, tol, "d route_weights")
    for p, q in zip(params, p64):
        if p is not None:
            assert_close(p.grad, q.grad, tol, "dparam")


def test_leaf_mlp_state_dict_copy_and_pickle():
    layer = tritonlab.LeafMLP(3, 6, 5, 4, "swiglu", backend="torch")
    x, idx = rand(7, 6), torch.randint(0, 3, (7, 2))
    y = layer(x, idx)
    other = tritonlab.LeafMLP(3, 6, 5, 4, "swiglu", backend="torch")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x, idx), y)
    import pickle
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x, idx), y)
    with pytest.raises(RuntimeError, match="b1"):
        tritonlab.LeafMLP(3, 6, 5, 4, "swiglu", bias=False).load_state_dict(layer.state_dict())
    with pytest.raises(RuntimeError, match="records activation='swiglu'"):  # (w1 is [G, D, 2H] for swiglu, too)
        tritonlab.LeafMLP(3, 6, 5, 4, "relu").load_state_dict(layer.state_dict())


# ----------------------------------------------------------------------------- QuantizedFFN

def _linears(d=16, h=24, o=8, bias=True):
    l1, l2 = nn.Linear(d, h, bias=bias), nn.Linear(h, o, bias=bias)
    if bias:
        with torch.no_grad():
            l1.bias.normal_(0.0, 0.3)
            l2.bias.normal_(0.0, 0.3)
    return l1, l2


@pytest.mark.parametrize("saved,target", [("fp8_e4m3", "int8"), ("int8", "fp8_e4m3"), ("fp8_e4m3", "fp8_e5m2")])
def test_quantized_ffn_refuses_a_checkpoint_of_another_format(saved, target):
    """load_state_dict used to cast the int8 / fp8 values into the module's own format (copy_) and
    run on with garbage against the scales. Now it raises naming the format, and loads nothing."""
    l1, l2 = _linears()
    src = tritonlab.QuantizedFFN.from_float(l1, l2, "gelu", saved, backend="torch")
    dst = tritonlab.QuantizedFFN.from_float(*_linears(), "gelu", target, backend="torch")
    before = {n: b.clone() for n, b in dst.named_buffers()}
    with pytest.raises(RuntimeError, match=f"w1_q holds {saved}"):
        dst.load_state_dict(src.state_dict())
    for n, b in dst.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b.view(torch.uint8), before[n].view(torch.uint8)), n
    same = tritonlab.QuantizedFFN.from_float(*_linears(), "gelu", saved, backend="torch")
    same.load_state_dict(src.state_dict())  # the same format loads, and runs as the source does
    x = rand(5, 16)
    assert torch.equal(same(x), src(x))


@pytest.mark.parametrize("given,name", [(nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Identity, None),
                                        (nn.Identity(), None), (nn.GELU(approximate="tanh"), "gelu_tanh")])
def test_quantized_ffn_takes_activation_modules_and_classes(given, name):
    """The docstring offers nn.ReLU / nn.GELU / nn.SiLU; the classes themselves were refused, and so
    was nn.Identity (None and "identity" were accepted)."""
    ffn = tritonlab.QuantizedFFN.from_float(*_linears(), given, "int8", backend="torch")
    assert ffn.activation == name
    with pytest.raises(ValueError, match="activation"):
        tritonlab.QuantizedFFN.from_float(*_linears(), nn.Tanh, "int8")


def test_scaled_matmul_path_refuses_what_scaled_matmul_refuses():
    """It named a path for pairs that scaled_matmul rejects (int8 with fp8, a float32 operand)."""
    from tritonlab.kernels.quantized import scaled_matmul_path
    i8, f8 = torch.zeros(4, 8, dtype=torch.int8), torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="b_q has dtype"):
        scaled_matmul_path(i8, f8)
    with pytest.raises(TypeError, match="a_q must have dtype"):
        scaled_matmul_path(torch.zeros(4, 8), i8)
    with pytest.raises(ValueError, match="b_q must be \\[N, K\\] with K = 8"):
        scaled_matmul_path(i8, torch.zeros(6, 9, dtype=torch.int8))


def test_quantized_ffn_biases_are_a_snapshot_of_the_float_layers():
    """from_float quantizes the weights once; the float32 biases were views of linear.bias, so training
    the float layers afterwards changed the quantized module's output."""
    l1, l2 = _linears()
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "int8", backend="torch")
    x = rand(6, 16)
    y = ffn(x)
    with torch.no_grad():
        l1.bias.add_(torch.randn_like(l1.bias))
        l2.bias.mul_(-2.0)
    assert torch.equal(ffn(x), y)


def test_quantized_ffn_from_meta_linears_and_device_mix():
    meta = torch.device("meta")
    l1, l2 = nn.Linear(16, 24, device=meta), nn.Linear(24, 8, device=meta)
    ffn = tritonlab.QuantizedFFN.from_float(l1, l2, "gelu", "fp8_e4m3", backend="torch")
    assert ffn.w1_q.is_meta and ffn.w1_q.dtype == torch.float8_e4m3fn and ffn.w2_scale.shape == (8, 1)
    y = ffn(torch.empty(3, 5, 16, device=meta))
    assert y.shape == (3, 5, 8) and y.is_meta
    with pytest.raises(ValueError, match="linear2.weight"):
        tritonlab.QuantizedFFN.from_float(nn.Linear(16, 24), l2, "gelu", "int8")


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.5, float("inf")])
@pytest.mark.parametrize("which", ["w1_scale", "w2_scale"])
def test_quantized_ffn_refuses_unusable_scales(which, bad):
    """A NaN, zero, negative or infinite weight scale (a hand-built module) would corrupt every
    output; the constructor names the scale instead."""
    src = tritonlab.QuantizedFFN.from_float(*_linears(), "relu", "int8", backend="torch")
    parts = {n: getattr(src, n) for n in ("w1_q", "w1_scale", "b1", "w2_q", "w2_scale", "b2")}
    parts[which] = parts[which].clone()
    parts[which][int(torch.randint(parts[which].shape[0], ()))] = bad
    with pytest.raises(ValueError, match=which):
        tritonlab.QuantizedFFN(parts["w1_q"], parts["w1_scale"], parts["b1"], parts["w2_q"], parts["w2_scale"],
                               parts["b2"], "relu", "int8")


# ----------------------------------------------------------------------------- FFTTokenMixer

@pytest.mark.parametrize("name,call", [
    ("dim", lambda: FFTTokenMixer(True, 8, "filter")),
    ("seq_len", lambda: FFTTokenMixer(4, True, "filter")),
    ("seq_len", lambda: FFTTokenMixer(4, 8.0, "conv")),
    ("hidden", lambda: FFTTokenMixer(4, 8, "adaptive", hidden=-3)),
    ("hidden", lambda: FFTTokenMixer(4, 8, "adaptive", hidden=0)),
    ("hidden", lambda: FFTTokenMixer(4, 8, "adaptive", hidden=2.5)),
    ("conv_order", lambda: FFTTokenMixer(4, 8, "conv", conv_order=2.5)),
    ("conv_order", lambda: FFTTokenMixer(4, 8, "conv", conv_order="8")),
    ("conv_bands", lambda: FFTTokenMixer(4, 8, "conv", conv_bands=1.5)),
    ("filter_std", lambda: FFTTokenMixer(4, 8, "filter", filter_std=float("nan"))),
    ("filter_std", lambda: FFTTokenMixer(4, 8, "adaptive", filter_std=-0.1)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_mixer_construction_errors_name_the_argument(name, call):
    with pytest.raises(ValueError, match=name):
        call()


def test_mixer_accepts_numpy_integers():
    m = FFTTokenMixer(np.int64(4), np.int32(9), "adaptive", hidden=np.int64(5), filter_std=np.float32(0.05))
    assert m.filter.shape == (5, 4, 2) and m.context_mlp[0].out_features == 5
    assert m(rand(2, 9, 4)).shape == (2, 9, 4)


def _mixer_reference(m: FFTTokenMixer, x: torch.Tensor) -> torch.Tensor:
    """The mixer from its docstring, with torch.fft, in x's dtype (float64 in the test): the conv
    kernel's positions, features and decays are rebuilt here, not taken from conv_kernel."""
    k = None
    if m.mode == "conv":
        s = x.shape[-2]
        t = torch.arange(s, dtype=x.dtype)[:, None] / m.seq_len
        f = torch.arange(1, m.conv_bands + 1, dtype=x.dtype)[None, :]
        z = torch.cat([t, torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)], 1)
        alpha = torch.linspace(math.log(100) / 1.5, math.log(100) / 0.3, m.dim, dtype=x.dtype)
        k = m.implicit_filter(z) * torch.exp(-t * alpha)
    return _module_reference(m, x, conv_kernel=k)


@pytest.mark.parametrize("mode", ["fnet", "filter", "adaptive", "conv"])
@pytest.mark.parametrize("s,lead", [(1, (2,)), (13, (2, 3)), (7, ())])
def test_mixer_prime_and_tiny_lengths_match_float64(backend, device, mode, s, lead):
    d = 5
    m = FFTTokenMixer(d, s, mode, hidden=6, conv_order=8, conv_bands=2, backend=backend).to(device)
    if mode == "adaptive":  # a non-trivial gain (the last layer starts at zero)
        nn.init.normal_(m.context_mlp[2].weight, std=0.3)
        nn.init.normal_(m.context_mlp[2].bias, std=0.3)
    m64 = copy.deepcopy(m).double()
    x = rand(*lead, s, d, device=device).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y64 = m(x), _mixer_reference(m64, x64)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y64, 1e-5, f"{mode} forward")
    g = rand(*y.shape, device=device)
    y.backward(g)
    y64.backward(g.double())
    assert_close(x.grad, x64.grad, 1e-5, f"{mode} dx")
    for (name, p), (_, q) in zip(m.named_parameters(), m64.named_parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, q.grad, 1e-4, f"{mode} d{name}")


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.012), (torch.float16, 0.0018)])
def test_conv_kernel_of_a_half_module_keeps_its_positions(dtype, bound):
    """After model.to(bfloat16) the implicit kernel's positions were built in bfloat16: beyond 256
    they collapse (16384 positions gave 1025 distinct rows) and the cos/sin features lose their
    phase. Positions and features are now computed in float32, then rounded: each kernel row is the
    float32 module's within the dtype's rounding of the MLP (median row error ~0.007 for bf16 and
    ~0.0007 for fp16, against ~0.022 and ~0.0035 before)."""
    s = 4096
    m = FFTTokenMixer(8, s, "conv", backend="torch")
    with torch.no_grad():
        k32 = m.conv_kernel(s)
        half = copy.deepcopy(m).to(dtype)
        k = half.conv_kernel(s)
    assert k.dtype == dtype and k.shape == (s, 8)
    row_err = (k.float() - k32).norm(dim=1) / k32.norm(dim=1)
    assert float(row_err.median()) < bound


def test_modules_compile_in_one_graph():
    """torch.compile(fullgraph=True) of a block using all three modules (torch backend), forward and
    backward equal to eager."""
    mixer = FFTTokenMixer(8, 6, "conv", conv_order=4, conv_bands=1, backend="torch")
    leaf = tritonlab.LeafMLP(3, 8, 5, 8, "swiglu", backend="torch")
    qffn = tritonlab.QuantizedFFN.from_float(*_linears(8, 12, 8), "gelu", "int8", backend="torch")

    def block(x, idx):
        h = mixer(x)
        return leaf(h, idx) + qffn(h.detach())

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = rand(2, 6, 8).requires_grad_()
    idx = torch.randint(0, 3, (2, 6))
    y = compiled(x, idx)
    want = block(x, idx)
    torch.testing.assert_close(y, want)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_eager,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, gx_eager)


# ----------------------------------------------------------------------------- settings in the state dict

def _reload(module: nn.Module) -> dict:
    """module's state dict through torch.save / torch.load(weights_only=True), as a checkpoint travels."""
    import io
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("saved,target,setting", [
    (("filter", 16), ("filter", 17), "seq_len=16"),  # both filters are [9, D]
    (("conv", 64), ("conv", 128), "seq_len=64"),  # same parameters, positions scaled by another length
    (("filter", 16), ("adaptive", 16), "mode='filter'"),
])
def test_mixer_refuses_a_checkpoint_made_with_other_settings(saved, target, setting):
    """The same tensors under another seq_len mix differently, and loading used to succeed silently.
    The state dict records mode and seq_len now; a mismatch raises naming both, and loads nothing."""
    src = FFTTokenMixer(8, saved[1], saved[0], backend="torch")
    dst = FFTTokenMixer(8, target[1], target[0], backend="torch")
    before = {n: p.clone() for n, p in dst.state_dict().items() if isinstance(p, torch.Tensor)}
    with pytest.raises(RuntimeError, match=f"records {setting}, but this FFTTokenMixer has"):
        dst.load_state_dict(_reload(src))
    for n, p in dst.state_dict().items():
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, before[n]), n
    same = FFTTokenMixer(8, saved[1], saved[0], backend="torch")
    same.load_state_dict(_reload(src))
    x = rand(2, saved[1], 8)
    assert torch.equal(same(x), src(x))


def test_fnet_mixer_loads_whatever_its_seq_len():
    """fnet has no parameters and mixes any length: its seq_len is not part of the record."""
    FFTTokenMixer(8, None, "fnet").load_state_dict(_reload(FFTTokenMixer(8, 32, "fnet")))


def test_quantized_ffn_refuses_a_checkpoint_of_another_activation():
    l1, l2 = _linears()
    src = tritonlab.QuantizedFFN.from_float(l1, l2, "relu", "int8", backend="torch")
    dst = tritonlab.QuantizedFFN.from_float(*_linears(), "gelu", "int8", backend="torch")
    before = {n: b.clone() for n, b in dst.named_buffers()}
    with pytest.raises(RuntimeError, match="records activation='relu', but this QuantizedFFN has activation='gelu'"):
        dst.load_state_dict(_reload(src))
    for n, b in dst.named_buffers():  # nothing was loaded
        assert torch.equal(b.view(torch.uint8), before[n].view(torch.uint8)), n


def test_the_record_is_a_tensor_that_survives_casts():
    """Code that treats every state-dict value as a tensor (an EMA copy, safetensors, a dtype cast of
    the whole dict) must keep working; a bf16 cast of the record still refuses the wrong module."""
    src = nn.Sequential(FFTTokenMixer(8, 16, "filter"), tritonlab.LeafMLP(3, 8, 5, 4, "relu"))
    sd = src.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    cast = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    with pytest.raises(RuntimeError, match="records seq_len=16"):
        nn.Sequential(FFTTokenMixer(8, 17, "filter"), tritonlab.LeafMLP(3, 8, 5, 4, "relu")).load_state_dict(cast)
    with pytest.raises(RuntimeError, match="records activation='relu'"):
        nn.Sequential(FFTTokenMixer(8, 16, "filter"), tritonlab.LeafMLP(3, 8, 5, 4, "gelu")).load_state_dict(cast)
    nn.Sequential(FFTTokenMixer(8, 16, "filter"), tritonlab.LeafMLP(3, 8, 5, 4, "relu")).load_state_dict(cast)


@pytest.mark.parametrize("make", [
    lambda act: tritonlab.FastFeedForward(6, 4, 5, depth=2, activation=act, master_leaf_width=3, backend="torch"),
    lambda act: tritonlab.LeafMLP(3, 6, 5, 4, act, backend="torch"),
], ids=["FastFeedForward", "LeafMLP"])
def test_layers_refuse_a_checkpoint_of_another_activation(make):
    src, dst = make("relu"), make("gelu")
    before = {n: p.clone() for n, p in dst.named_parameters()}
    with pytest.raises(RuntimeError, match="records activation='relu', but this .* has activation='gelu'"):
        dst.load_state_dict(_reload(src))
    for n, p in dst.named_parameters():  # nothing loaded, not even into the master leaf (a submodule)
        assert torch.equal(p, before[n]), n
    make("relu").load_state_dict(_reload(src))


def test_checkpoints_without_the_record_still_load_strictly():
    """State dicts saved before the record existed (or assembled by hand) load as before."""
    src = FFTTokenMixer(8, 16, "adaptive", backend="torch")
    legacy = {k: v for k, v in src.state_dict().items() if not k.endswith("_extra_state")}
    dst = FFTTokenMixer(8, 16, "adaptive", backend="torch")
    assert dst.load_state_dict(legacy, strict=True).missing_keys == []
    x = rand(2, 16, 8)
    assert torch.equal(dst(x), src(x))
    ffn = tritonlab.QuantizedFFN.from_float(*_linears(), "silu", "int8", backend="torch")
    legacy = {k: v for k, v in ffn.state_dict().items() if not k.endswith("_extra_state")}
    assert tritonlab.QuantizedFFN.from_float(*_linears(), "silu", "int8").load_state_dict(legacy).missing_keys == []


# ----------------------------------------------------------------------------- every op on the meta device

@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_every_op_gives_shapes_on_the_meta_device(backend_name):
    """Meta tensors (shape inference, deferred init) go through each op's fake implementation on
    either backend (_backend.dispatch): no kernel or fallback tries to read data they do not have."""
    meta = torch.device("meta")
    b, s, d = (int(v) for v in torch.randint(1, 9, (3,)))
    x = torch.empty(b, s, d, device=meta)
    x2 = x.reshape(b * s, d)
    be = {"backend": backend_name}
    assert tritonlab.fnet_mix(x, **be).shape == x.shape
    assert tritonlab.spectral_filter(x, torch.empty(s // 2 + 1, d, dtype=torch.complex64, device=meta), **be).shape == x.shape
    assert tritonlab.fft_conv(x, torch.empty(s, d, device=meta), **be).shape == x.shape
    idx = torch.zeros(b * s, 2, dtype=torch.int64, device=meta)
    assert tritonlab.gather_matmul_scatter(x2, torch.empty(3, d, 5, device=meta), idx, **be).shape == (b * s, 5)
    assert tritonlab.tree_route(x, torch.empty(7, d, device=meta), **be).shape == (b, s)
    q, scale = tritonlab.quantize(x2, "int8", **be)
    assert q.shape == x2.shape and q.dtype == torch.int8 and scale.shape == (b * s, 1) and q.is_meta
