"""Small helpers for tests: random tensors of a dtype, and dtype-rounded float64 copies."""
from __future__ import annotations

import numpy as np
import torch

from tritonlab.kernels._accuracy import tolerance  # noqa: F401  (re-exported for tests)
from tritonlab.kernels._accuracy import assert_close, rel_error, to_numpy  # noqa: F401

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape: int, dtype: torch.dtype = torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard normal * scale, drawn in float32 and cast (never zeros or ones)."""
    return (scale * torch.randn(*shape)).to(device=device, dtype=dtype)


def np64(t: torch.Tensor | None) -> np.ndarray | None:
    """The exact values of a (possibly low-precision) tensor as float64 NumPy, for references."""
    return None if t is None else to_numpy(t)


def graph_replay(fn):
    """fn captured once in a CUDA graph (after a warm-up on a side stream); returns a function that
    replays the graph and returns the captured output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]
