"""tritonlab.kernels: the kernel families, each in one folder (Triton kernels, launchers, torch
fallbacks, float64 NumPy references and the nn.Module side by side).

- tree_routing:  tree_route, fff_forward, fff_path_forward, FastFeedForward
- grouped_gemm:  gather_matmul_scatter, leaf_mlp, LeafMLP
- quantized:     quantize, scaled_matmul, QuantizedFFN (quantize_path, scaled_matmul_path: which path runs)
- fft_mixing:    fnet_mix, spectral_filter, fft_conv, FFTTokenMixer

Families are imported on first use of one of their names, so `import tritonlab` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tree_route": "tree_routing", "fff_forward": "tree_routing", "fff_path_forward": "tree_routing",
    "FastFeedForward": "tree_routing",
    "gather_matmul_scatter": "grouped_gemm", "leaf_mlp": "grouped_gemm", "LeafMLP": "grouped_gemm",
    "quantize": "quantized", "scaled_matmul": "quantized", "QuantizedFFN": "quantized",
    "quantize_path": "quantized", "scaled_matmul_path": "quantized",
    "fnet_mix": "fft_mixing", "spectral_filter": "fft_mixing", "fft_conv": "fft_mixing",
    "FFTTokenMixer": "fft_mixing",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    family = _EXPORTS.get(name)
    if family is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{family}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{family}":
            raise AttributeError(f"{name}: kernel family {family!r} is not available yet") from e
        raise
    value = globals()[name] = getattr(module, name)  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
