"""Tree routing (Fast Feedforward networks): kernels, launchers, torch fallbacks, NumPy references.

Files: triton_kernels.py (the @triton.jit kernels), ops.py (public ops, launchers, custom-op and
tuning registration), fallback.py (torch), reference.py (float64 NumPy), module.py (nn.Module).
"""
from .module import FastFeedForward
from .ops import fff_forward, fff_path_forward, tree_route

__all__ = ["tree_route", "fff_forward", "fff_path_forward", "FastFeedForward"]
