"""tritonlab: Triton kernels for tree-routed, grouped-expert, 8-bit and FFT-mixing feed-forward layers.

The ops and modules of `tritonlab.kernels` are re-exported here (tritonlab.fff_forward,
tritonlab.FastFeedForward, ...). Importing this package also imports the autotuner, which plugs the
per-GPU tuning database into the kernels' config lookup.
"""
from __future__ import annotations

from typing import Any

from . import autotune as _autotune  # noqa: F401  (installs the tuning-database config provider)
from . import kernels
from .kernels import __all__ as _kernel_names

__version__ = "0.1.0"
__all__ = list(_kernel_names) + ["kernels"]


def __getattr__(name: str) -> Any:
    if name in _kernel_names:
        value = globals()[name] = getattr(kernels, name)  # later lookups find it without this function
        return value
    raise AttributeError(f"module 'tritonlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazily re-exported ops and modules too (tab completion, help())."""
    return sorted(set(globals()) | set(__all__))
