"""Edge cases of the FFT mixing ops found by fuzzing them against the NumPy references: compiled
graphs with dynamic shapes, lengths past the Triton plans under "auto", describe_plan's arguments."""
from __future__ import annotations

import pytest
import torch

import tritonlab
from tritonlab.kernels.fft_mixing import FFTTokenMixer, describe_plan, ops, plans
from tritonlab.kernels.fft_mixing import reference as ref

from helpers import assert_close, np64, rand, tolerance


def test_filter_mixer_compiles_with_dynamic_shapes(backend, device):
    """torch.compile(dynamic=True, fullgraph=True) of a "filter" mixer: the filter (a parameter, static
    shape) is checked against x's symbolic shape; dynamo answered `shape in (shared, batched)` wrongly
    there and the trace hit spectral_filter's shape ValueError on a valid input."""
    s, d = 12, 5
    m = FFTTokenMixer(d, s, "filter", backend=backend).to(device)
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for b in (3, 2):
        x = rand(b, s, d, device=device).requires_grad_()
        y = compiled(x)
        assert_close(y, ref.spectral_filter_ref(np64(x), np64(m.complex_filter())), tolerance(torch.float32))
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_eager,) = torch.autograd.grad(m(x).sum(), x)
        assert_close(gx, gx_eager, tolerance(torch.float32))
    torch._dynamo.reset()


@pytest.fixture
def restore_plans():
    yield
    plans.conv_plan.cache_clear()
    plans.dft_plan.cache_clear()


def test_fnet_auto_leaves_lengths_past_the_split_path_to_torch(monkeypatch, device, restore_plans):
    """A length past plans.MAX_SPLIT_M has no fast Triton plan (the convolutions then run torch.fft
    under "auto"); fnet_mix sent it to the O(n^2) dense DFT GEMM, whose grid dim 1 (cdiv(S, BLOCK_K))
    passes CUDA's 65535 past S ~ 2M: "auto" raised "use backend='torch'". Here the limits are shrunk
    (split path up to 64, grid dims up to 2) so that a short prime S plays that part."""
    monkeypatch.setattr(plans, "MAX_SPLIT_M", 64)
    monkeypatch.setattr(ops, "MAX_GRID_BATCH", 2)
    plans.conv_plan.cache_clear()
    plans.dft_plan.cache_clear()
    monkeypatch.setenv("TRITONLAB_BACKEND", "triton")  # "auto" means Triton here, as on a GPU
    s = 131
    x = rand(2, s, 3, device=device)
    assert_close(tritonlab.fnet_mix(x), ref.fnet_mix_ref(np64(x)), tolerance(torch.float32))
    with pytest.raises(ValueError, match="no Triton plan"):
        tritonlab.fnet_mix(x, backend="triton")
    assert describe_plan("fnet_mix", s, 3) == "torch.fft (no Triton plan)"


def test_describe_plan_checks_its_arguments():
    """An unknown op name ("fft_conv", the public op's own name) described the circular plan, and
    fnet_mix without its width described D as "None: dense DFT GEMM"."""
    assert describe_plan("fft_conv_causal", 1024) != describe_plan("fft_conv_circular", 1024)
    with pytest.raises(ValueError, match="op must be one of"):
        describe_plan("fft_conv", 1024)
    with pytest.raises(ValueError, match="d"):
        describe_plan("fnet_mix", 1024)
