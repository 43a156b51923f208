"""The one small interface between kernels and the autotuner.

Kernels never import `tritonlab.autotune`. Instead:
- each kernel family describes its tunable kernels as `TunableKernel` records and `register`s them
  here; the autotuner walks `registered()` (it knows kernels only through this registry);
- each launcher asks `lookup_config(name, shape, dtype, device)` for its launch configuration; the
  autotuner installs the tuning-database lookup with `set_config_provider` when it is imported
  (importing `tritonlab.kernels` imports the `tritonlab` package first, which imports the autotuner).
  Without a provider, or when the provider has no entry, the kernel's heuristic default is used.

A `shape` is a small dict of ints naming the problem size (for example {"T": 4096, "D": 768,
"depth": 8}); a `config` is a dict of launch parameters (block sizes, num_warps, num_stages, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

Shape = Mapping[str, int]
Config = dict[str, Any]


@dataclass(frozen=True)
class TunableKernel:
    """What the autotuner needs to know about one Triton kernel (by launcher name)."""

    name: str
    #: the heuristic default config for a shape (what runs when nothing is tuned)
    default: Callable[[Shape], Config]
    #: candidate configs for a shape, already pruned to those that fit the shape
    space: Callable[[Shape], list[Config]]
    #: build inputs for a shape: (shape, dtype, device) -> opaque inputs object
    make_inputs: Callable[[Shape, torch.dtype, torch.device], Any]
    #: run the kernel once on the inputs with a config; returns the output tensor
    run: Callable[[Any, Config], torch.Tensor]
    #: error of an output against the float64 NumPy reference for the same inputs
    #: (usually kernels._accuracy.rel_error(out, reference(inputs)))
    error: Callable[[Any, torch.Tensor], float]
    #: largest acceptable `error` for a dtype: a config above it is rejected
    tolerance: Callable[[torch.dtype], float]
    #: shape presets: "small" (interpreter-sized), "models" (the issues' speed targets), "full"
    presets: Mapping[str, list[Shape]] = field(default_factory=dict)
    #: dtypes worth tuning
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    #: shape dims that count tokens (bucketed to powers of two; decode never borrows prefill configs)
    token_dims: tuple[str, ...] = ("T", "M")
    #: optional shared-memory estimate (shape, config, dtype) -> bytes, used to prune configs before compiling
    smem_bytes: Optional[Callable[[Shape, Config, torch.dtype], int]] = None


class NotApplicable(RuntimeError):
    """Raised by a TunableKernel's make_inputs when the kernel does not exist for this device and
    dtype (fp8 GEMMs below compute capability 8.9): one clear reason instead of a compile failure
    per config. The tuner reports the job failed with this reason; compile-check reports it n/a."""


_REGISTRY: dict[str, TunableKernel] = {}
_provider: Optional[Callable[[str, Shape, torch.dtype, torch.device], Optional[Config]]] = None


def register(kernel: TunableKernel) -> TunableKernel:
    """Add (or replace) a tunable kernel in the registry."""
    _REGISTRY[kernel.name] = kernel
    return kernel


def registered() -> dict[str, TunableKernel]:
    """All registered tunable kernels, by name (imports every kernel family first)."""
    from . import _families  # noqa: F401  (importing the families registers their kernels)

    return dict(_REGISTRY)


def set_config_provider(fn: Optional[Callable[[str, Shape, torch.dtype, torch.device], Optional[Config]]]) -> None:
    """Install the function that answers config lookups (the autotuner's database), or None."""
    global _provider
    _provider = fn


def lookup_config(name: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> Config:
    """The launch config for kernel `name` on a problem: tuned entry if any, else the heuristic default."""
    kernel = _REGISTRY[name]
    if _provider is not None and device.type == "cuda":
        found = _provider(name, shape, dtype, device)
        if found:
            merged = kernel.default(shape)
            merged.update(found)
            return merged
    return kernel.default(shape)
