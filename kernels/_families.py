"""Imports every kernel family so that their tunable kernels register themselves (see _tuning)."""
from . import tree_routing  # noqa: F401

for _optional in ("grouped_gemm", "quantized", "fft_mixing"):
    try:
        __import__(f"{__package__}.{_optional}")
    except ModuleNotFoundError as e:  # a family not written yet
        if not e.name or not e.name.endswith(_optional):
            raise
