"""LeafMLP: a mixture-of-experts / tree-leaf layer over precomputed routing, running on leaf_mlp."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._backend import FLOAT_DTYPES, RecordedSettings, check_backend, is_int
from .ops import LEAF_ACTIVATIONS, leaf_mlp


class LeafMLP(RecordedSettings, nn.Module):
    """`num_groups` independent MLPs (experts, or FFF leaves); each token runs the k it is routed to.

    The router is the caller's: forward takes `indices` [..., k] (or [...]) group ids and optional
    `route_weights` of the same shape, and returns sum_j rw[..., j] * expert_{indices[..., j]}(x).
    Gradients flow to x, the expert weights and the route weights (so a router upstream trains).

    Parameters: w1 [G, D, H] ([G, D, 2H] for "swiglu": gate columns first, then up), b1, w2 [G, H, O],
    b2 (biases optional), initialized like nn.Linear (uniform +-1/sqrt(fan_in)).
    """

    def __init__(self, num_groups: int, input_width: int, hidden_width: int, output_width: Optional[int] = None,
                 activation: Optional[str] = "relu", *, bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        output_width = input_width if output_width is None else output_width
        for name, v in (("num_groups", num_groups), ("input_width", input_width), ("hidden_width", hidden_width),
                        ("output_width", output_width)):
            if not is_int(v):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        num_groups, input_width, hidden_width, output_width = (int(v) for v in (num_groups, input_width, hidden_width,
                                                                               output_width))
        if dtype is not None and dtype not in FLOAT_DTYPES:
            # leaf_mlp runs float32 / float16 / bfloat16 weights only: refuse a layer no forward could run
            names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
            raise TypeError(f"dtype must be one of ({names}) or None, got {dtype}")
        if activation not in LEAF_ACTIVATIONS:
            raise ValueError(f"activation must be one of {LEAF_ACTIVATIONS}, got {activation!r}")
        self.num_groups, self.input_width, self.hidden_width, self.output_width = num_groups, input_width, hidden_width, output_width
        self.activation, self.backend = activation, check_backend(backend)
        h1 = 2 * hidden_width if activation == "swiglu" else hidden_width
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(num_groups, input_width, h1, **kw))
        self.w2 = nn.Parameter(torch.empty(num_groups, hidden_width, output_width, **kw))
        self.b1 = nn.Parameter(torch.empty(num_groups, h1, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_groups, output_width, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        s1, s2 = 1.0 / math.sqrt(self.input_width), 1.0 / math.sqrt(self.hidden_width)
        with torch.no_grad():
            for p, s in ((self.w1, s1), (self.b1, s1), (self.w2, s2), (self.b2, s2)):
                if p is not None:
                    p.uniform_(-s, s)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, route_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., input_width], indices [..., k] or [...] -> [..., output_width]."""
        return leaf_mlp(x, indices, self.w1, self.b1, self.w2, self.b2, self.activation, route_weights,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_groups={self.num_groups}, input_width={self.input_width}, hidden_width={self.hidden_width}, "
                f"output_width={self.output_width}, activation={self.activation!r}, bias={self.b1 is not None}")

    def recorded_settings(self) -> dict:
        """Recorded in the state dict (RecordedSettings): relu, gelu and silu leaves have the same
        tensors (swiglu's w1 is twice as wide)."""
        return {"activation": self.activation}
