"""FastFeedForward: the FFF layer of Belcak & Wattenhofer, trained soft, run hard through the kernels."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from .._backend import (FLOAT_DTYPES, RecordedSettings, check_activation, check_backend, check_features,
                        check_same_device, check_tensor, is_int, torch_activation)
from .ops import MAX_DEPTH, fff_forward, leaf_counts, tree_route

#: what from_fastfeedforward reads of a fastfeedforward.FFF
_FFF_ATTRIBUTES = ("activation", "input_width", "leaf_width", "output_width", "node_weights", "node_biases",
                   "w1s", "b1s", "w2s", "b2s")


class FastFeedForward(RecordedSettings, nn.Module):
    """A binary tree of `2**depth - 1` node neurons over `2**depth` leaf MLPs of width `leaf_width`.

    Training (module.training): the soft tree of the FFF paper; each node gives sigmoid(logit) to
    its right subtree and 1 - sigmoid to its left, and the output is the mixture of all leaves
    (dense, as the paper trains). With `train_hardened=True` the node decisions are rounded (0/1).
    Inference (eval mode): hard routing through `fff_forward`, so each token runs only its leaf.

    `master_leaf_width` > 0 adds a master leaf (Charalampopoulos et al., "Enhancing Fast Feed
    Forward Networks with Load Balancing and a Master Leaf Node"): a dense MLP of that width that
    every token passes through, added to its routed leaf's output.

    Parameters follow the `fastfeedforward` package's shapes: node_weight [N, D], node_bias [N],
    w1 [L, D, H], b1 [L, H], w2 [L, H, O], b2 [L, O].
    """

    def __init__(self, input_width: int, leaf_width: int, output_width: int, depth: int,
                 activation: str = "relu", *, master_leaf_width: int = 0, train_hardened: bool = False,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        for name, v in (("depth", depth), ("input_width", input_width), ("leaf_width", leaf_width),
                        ("output_width", output_width), ("master_leaf_width", master_leaf_width)):
            if not is_int(v):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        depth, input_width, leaf_width, output_width, master_leaf_width = (
            int(v) for v in (depth, input_width, leaf_width, output_width, master_leaf_width))
        if not 0 <= depth <= MAX_DEPTH:  # deeper trees: the kernels refuse them, and 2**25 leaves are no layer
            raise ValueError(f"depth must be in [0, {MAX_DEPTH}], got {depth}")
        for name, v in (("input_width", input_width), ("leaf_width", leaf_width), ("output_width", output_width)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        check_activation(activation)
        self.input_width, self.leaf_width, self.output_width, self.depth = input_width, leaf_width, output_width, depth
        self.activation, self.train_hardened, self.backend = activation, train_hardened, check_backend(backend)
        self.dropout = nn.Dropout(dropout)
        n_nodes, n_leaves = 2**depth - 1, 2**depth
        s1, s2 = 1.0 / math.sqrt(input_width), 1.0 / math.sqrt(leaf_width)
        self.node_weight = nn.Parameter(torch.empty(n_nodes, input_width).uniform_(-s1, s1))
        self.node_bias = nn.Parameter(torch.empty(n_nodes).uniform_(-s1, s1))
        self.w1 = nn.Parameter(torch.empty(n_leaves, input_width, leaf_width).uniform_(-s1, s1))
        self.b1 = nn.Parameter(torch.empty(n_leaves, leaf_width).uniform_(-s1, s1))
        self.w2 = nn.Parameter(torch.empty(n_leaves, leaf_width, output_width).uniform_(-s2, s2))
        self.b2 = nn.Parameter(torch.empty(n_leaves, output_width).uniform_(-s2, s2))
        self.master: Optional[nn.Sequential] = None
        if master_leaf_width > 0:
            self.master = nn.Sequential(nn.Linear(input_width, master_leaf_width), _Activation(activation),
                                        nn.Linear(master_leaf_width, output_width))

    def extra_repr(self) -> str:
        return (f"input_width={self.input_width}, leaf_width={self.leaf_width}, output_width={self.output_width}, "
                f"depth={self.depth}, activation={self.activation!r}, train_hardened={self.train_hardened}, "
                f"backend={self.backend!r}")

    def recorded_settings(self) -> dict:
        """Recorded in the state dict (RecordedSettings): the leaves' activation is in no tensor's shape."""
        return {"activation": self.activation}

    @classmethod
    def from_fastfeedforward(cls, module: nn.Module, *, backend: str = "auto") -> "FastFeedForward":
        """Copy a `fastfeedforward.FFF` (PyPI package 0.2.1) into this layer.

        The eval output equals that module's hard-decision forward *including* b2s
        (`training_forward(x, use_hard_decisions=True)`; its `eval_forward` drops b2s).
        Its `train_hardened`, `dropout` and train/eval mode carry over; `region_leak` (random
        decision flips while training) has no equivalent here and is dropped with a warning.
        The copy is on that module's device and in its dtype (float32 for a float64 module: the
        kernels take float32, float16 and bfloat16); a module on the meta device gives one there.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a fastfeedforward.FFF, got {type(module).__name__}")
        missing = [a for a in _FFF_ATTRIBUTES if not hasattr(module, a)]
        if missing:
            raise TypeError(f"module must be a fastfeedforward.FFF, got a {type(module).__name__} "
                            f"without {', '.join(missing)}")
        act = module.activation
        if isinstance(act, nn.ReLU):
            name = "relu"
        elif isinstance(act, nn.GELU):
            name = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        elif isinstance(act, nn.SiLU):
            name = "silu"
        else:
            raise ValueError(f"module.activation {type(act).__name__} has no kernel equivalent (relu, gelu, silu)")
        # from the node count, not module.depth: that is a tensor, which has no value on the meta device
        n_nodes = module.node_weights.shape[0]
        depth = (n_nodes + 1).bit_length() - 1
        if 2**depth - 1 != n_nodes:
            raise ValueError(f"module.node_weights must have 2**depth - 1 rows (a full tree), got {n_nodes}")
        if float(getattr(module, "region_leak", 0.0) or 0.0) != 0.0:
            warnings.warn(f"module.region_leak = {module.region_leak} is not carried over: FastFeedForward trains "
                          "without region leaks", UserWarning, stacklevel=2)
        out = cls(module.input_width, module.leaf_width, module.output_width, depth, name, backend=backend,
                  train_hardened=bool(getattr(module, "train_hardened", False)),
                  dropout=float(getattr(module, "dropout", 0.0) or 0.0))
        out.train(module.training)
        dtype = module.node_weights.dtype
        # moved before the copy: a copy out of meta tensors fails, and a float16/bfloat16 module stays one
        out.to(device=module.node_weights.device, dtype=dtype if dtype in FLOAT_DTYPES else torch.float32)
        with torch.no_grad():
            out.node_weight.copy_(module.node_weights)
            out.node_bias.copy_(module.node_biases.reshape(-1))
            for mine, theirs in ((out.w1, module.w1s), (out.b1, module.b1s), (out.w2, module.w2s), (out.b2, module.b2s)):
                mine.copy_(theirs)
        return out

    def forward(self, x: torch.Tensor, return_leaf_counts: bool = False):
        """x [..., input_width] -> [..., output_width] (and int64 [2**depth] leaf counts on request)."""
        check_tensor("x", x)
        check_features("x", x)
        if x.shape[-1] != self.input_width:
            raise ValueError(f"x must be [..., input_width = {self.input_width}], got shape {tuple(x.shape)}")
        check_same_device(x=x, node_weight=self.node_weight)
        if not isinstance(return_leaf_counts, bool):
            raise TypeError(f"return_leaf_counts must be a bool, got {type(return_leaf_counts).__name__}")
        counts = None
        if self.training:
            y = self._soft_forward(x)
            if return_leaf_counts:
                leaf = tree_route(x.detach(), self.node_weight.detach().to(x.dtype), self.node_bias.detach().to(x.dtype),
                                  backend=self.backend)
                counts = leaf_counts(leaf, 2**self.depth)
        else:
            p = [t.to(x.dtype) for t in (self.node_weight, self.node_bias, self.w1, self.b1, self.w2, self.b2)]
            y = fff_forward(x, *p, self.activation, return_leaf_counts=return_leaf_counts, backend=self.backend)
            if return_leaf_counts:
                y, counts = y
        if self.master is not None:  # in the parameters' dtype, as the soft tree
            y = y + self.master(x.to(self.w1.dtype)).to(y.dtype)
        return (y, counts) if return_leaf_counts else y

    def leaf_mixture(self, x2: torch.Tensor) -> torch.Tensor:
        """[T, 2**depth] leaf weights of the soft (or hardened) tree; rows sum to 1."""
        mix = x2.new_ones(x2.shape[0], 1)
        for level in range(self.depth):
            lo, hi = 2**level - 1, 2 ** (level + 1) - 1
            logit = x2 @ self.node_weight[lo:hi].T + self.node_bias[lo:hi]
            if self.train_hardened:
                # the hard route's rule (logit >= 0 goes right): round(sigmoid) sent logit 0, and
                # logits whose sigmoid rounds to 0.5 in half precision, left (no gradient either way)
                p_right = (logit >= 0).to(logit.dtype)
            else:
                p_right = torch.sigmoid(logit)
            # children of level node j are 2j (left) and 2j + 1 (right) on the next level
            mix = torch.stack((mix * (1 - p_right), mix * p_right), dim=-1).flatten(1)
        return mix

    def _soft_forward(self, x: torch.Tensor) -> torch.Tensor:
        # in the parameters' dtype (a bf16 x with float32 parameters trains in float32), output in x's
        x2 = x.reshape(-1, self.input_width).to(self.w1.dtype)
        mix = self.leaf_mixture(x2)  # [T, L]
        h = torch.einsum("td,ldh->tlh", x2, self.w1) + self.b1
        h = self.dropout(torch_activation(h, self.activation))
        y = (torch.einsum("tlh,lho->to", h * mix[:, :, None], self.w2) + mix @ self.b2).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.output_width)


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch_activation(x, self.name)
