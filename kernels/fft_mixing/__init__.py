"""FFT token mixing (FNet, global spectral filters, long convolutions): kernels, launchers, torch
fallbacks, NumPy references and the FFTTokenMixer module.

Files: plans.py (which transform each length takes, DFT tables), triton_kernels.py (the
@triton.jit kernels), ops.py (public ops, launchers, custom ops with autograd, tuning registration),
fallback.py (torch.fft), reference.py (float64 NumPy), module.py (nn.Module).
"""
from .module import FFTTokenMixer
from .ops import describe_plan, fft_conv, fnet_mix, spectral_filter

__all__ = ["fnet_mix", "spectral_filter", "fft_conv", "FFTTokenMixer", "describe_plan"]
