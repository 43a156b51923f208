"""Quantized FFN (int8 / fp8): kernels, launchers, torch fallbacks, NumPy references.

Files: triton_kernels.py (the @triton.jit kernels), ops.py (public ops, launchers, path choice,
custom-op and tuning registration), fallback.py (torch), reference.py (NumPy), module.py (nn.Module).
"""
from .module import QuantizedFFN
from .ops import fp8_supported, int8_gemm_supported, quantize, quantize_path, scaled_matmul, scaled_matmul_path

__all__ = ["quantize", "scaled_matmul", "QuantizedFFN", "quantize_path", "scaled_matmul_path", "fp8_supported",
           "int8_gemm_supported"]
