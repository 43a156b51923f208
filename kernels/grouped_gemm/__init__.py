"""Gather-matmul-scatter leaves: grouped leaf / expert GEMMs with fused gather, epilogue and scatter.

Files: grouping.py (device-side sort by group and tile maps, no host sync), triton_kernels.py (the
@triton.jit kernels), ops.py (public ops, launchers, autograd, custom-op and tuning registration),
fallback.py (torch, padded batched matmuls), reference.py (float64 NumPy), module.py (nn.Module).
"""
from .module import LeafMLP
from .ops import gather_matmul_scatter, leaf_mlp

__all__ = ["gather_matmul_scatter", "leaf_mlp", "LeafMLP"]
