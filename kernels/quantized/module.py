"""QuantizedFFN: an int8 / fp8 feed-forward block built from two float nn.Linear layers."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .._backend import (RecordedSettings, check_activation, check_backend, check_same_device, check_tensor,
                        flatten_tokens)
from .ops import QDTYPE, QuantDType, _qname, quantize, scaled_matmul, scaled_matmul_path

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_QNAME_OF_STORAGE = {storage: name for name, storage in QDTYPE.items()}


def _activation_name(activation: Union[str, nn.Module, type, None]) -> Optional[str]:
    if isinstance(activation, type) and issubclass(activation, (nn.ReLU, nn.GELU, nn.SiLU, nn.Identity)):
        activation = activation()  # the class, as in nn.Sequential-building code: its default form
    if isinstance(activation, nn.Identity):
        return None
    if isinstance(activation, nn.Module):
        if isinstance(activation, nn.GELU):
            return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
        for cls, name in _ACTIVATION_MODULES.items():
            if isinstance(activation, cls):
                return name
        raise ValueError(f"activation {type(activation).__name__} has no kernel equivalent (relu, gelu, silu)")
    check_activation(activation)
    return None if activation in (None, "none", "identity") else activation


class QuantizedFFN(RecordedSettings, nn.Module):
    """y = act(x @ W1.T + b1) @ W2.T + b2 with W1, W2 stored quantized (int8, fp8 e4m3 or e5m2).

    The weights are quantized once, per output channel (`quantize(weight, dtype, "row")`); each
    forward quantizes x per token, runs GEMM 1 with scale, bias and activation fused into its
    epilogue, quantizes the hidden activations per token, and runs GEMM 2 with its bias.
    For a hidden width H <= 256 the per-token quantization of the hidden layer happens in GEMM 1's
    epilogue (the hidden layer is never written in float); for wider layers GEMM 1 writes it in x's
    dtype (bf16 for bf16 models) and a quantize kernel follows. The output is in x's dtype.

    Build it with `QuantizedFFN.from_float(linear1, linear2, activation, dtype)`. It is an inference
    module: the quantized weights are buffers, no gradients flow. The state dict records dtype and
    activation; loading a checkpoint made with others raises.
    """

    def __init__(self, w1_q: torch.Tensor, w1_scale: torch.Tensor, b1: Optional[torch.Tensor],
                 w2_q: torch.Tensor, w2_scale: torch.Tensor, b2: Optional[torch.Tensor],
                 activation: Optional[str], dtype: QuantDType, *, float_weight_bytes: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        self.qdtype = _qname(dtype)
        self.activation = _activation_name(activation)
        storage = QDTYPE[self.qdtype]
        for name, w in (("w1_q", w1_q), ("w2_q", w2_q)):
            check_tensor(name, w, dtypes=(storage,), ndim=2)
        h, d = w1_q.shape
        o, h2 = w2_q.shape
        if h2 != h:
            raise ValueError(f"w2_q must be [O, H={h}], got {tuple(w2_q.shape)}")
        for name, scale, rows in (("w1_scale", w1_scale, h), ("w2_scale", w2_scale, o)):
            check_tensor(name, scale, dtypes=(torch.float32,))
            if tuple(scale.shape) not in ((rows,), (rows, 1)):
                raise ValueError(f"{name} must hold one float32 scale per output channel ([{rows}, 1]), "
                                 f"got shape {tuple(scale.shape)}")
        for name, bias, rows in (("b1", b1, h), ("b2", b2, o)):
            if bias is not None:
                check_tensor(name, bias)
                if tuple(bias.shape) != (rows,):
                    raise ValueError(f"{name} must be [{rows}], got shape {tuple(bias.shape)}")
        device = check_same_device(w1_q=w1_q, w1_scale=w1_scale, b1=b1, w2_q=w2_q, w2_scale=w2_scale, b2=b2)
        if device.type != "meta":  # checked once here: a NaN, zero or negative scale would corrupt every output
            for name, scale in (("w1_scale", w1_scale), ("w2_scale", w2_scale)):
                if not bool(((scale > 0) & torch.isfinite(scale)).all()):
                    raise ValueError(f"{name} must hold finite scales > 0 (as quantize returns them)")
        w1_scale, w2_scale = w1_scale.reshape(h, 1), w2_scale.reshape(o, 1)
        self.input_width, self.hidden_width, self.output_width = d, h, o
        self.backend = check_backend(backend)
        self.register_buffer("w1_q", w1_q)
        self.register_buffer("w1_scale", w1_scale)
        # copies, never views of the float layers' biases (from_float passes linear.bias itself): the
        # quantized module is a snapshot, which further training of the float layers leaves alone
        self.register_buffer("b1", None if b1 is None else b1.detach().to(torch.float32, copy=True))
        self.register_buffer("w2_q", w2_q)
        self.register_buffer("w2_scale", w2_scale)
        self.register_buffer("b2", None if b2 is None else b2.detach().to(torch.float32, copy=True))
        self.float_weight_bytes = float_weight_bytes

    @classmethod
    def from_float(cls, linear1: nn.Linear, linear2: nn.Linear,
                   activation: Union[str, nn.Module, type, None] = "gelu", dtype: QuantDType = "int8",
                   *, backend: str = "auto") -> "QuantizedFFN":
        """Quantize two float nn.Linear layers (D -> H, H -> O) once, per output channel.

        Args:
            linear1, linear2: nn.Linear(D, H) and nn.Linear(H, O), biases optional.
            activation: "relu" | "gelu" | "gelu_tanh" | "silu" | None, or an nn.ReLU / nn.GELU /
                nn.SiLU / nn.Identity module or class.
            dtype: "int8" | "fp8_e4m3" | "fp8_e5m2"; weights and activations use the same type.
        """
        for name, lin in (("linear1", linear1), ("linear2", linear2)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
        if linear2.in_features != linear1.out_features:
            raise ValueError(f"linear2 must take linear1's {linear1.out_features} outputs, "
                             f"got in_features={linear2.in_features}")
        params = {f"{name}.{what}": p for name, lin in (("linear1", linear1), ("linear2", linear2))
                  for what, p in (("weight", lin.weight), ("bias", lin.bias)) if p is not None}
        for name, p in params.items():
            check_tensor(name, p)
        device = check_same_device(**params)
        finite_check = device.type != "meta"  # meta tensors hold no values (a model skeleton)
        for name, p in params.items():
            if finite_check and not torch.isfinite(p).all():
                raise ValueError(f"{name} holds NaN or inf: a quantization scale would be NaN")
        qname = _qname(dtype)
        float_bytes = sum(p.numel() * p.element_size() for lin in (linear1, linear2) for p in lin.parameters())
        with torch.no_grad():
            w1_q, w1_s = quantize(linear1.weight.detach(), qname, "row", check_finite=finite_check, backend=backend)
            w2_q, w2_s = quantize(linear2.weight.detach(), qname, "row", check_finite=finite_check, backend=backend)
        return cls(w1_q, w1_s, linear1.bias, w2_q, w2_s, linear2.bias, _activation_name(activation), qname,
                   float_weight_bytes=float_bytes, backend=backend)

    def _apply(self, fn, recurse=True):
        """Module-wide casts (model.half(), .to(torch.bfloat16)) leave the quantized state's dtypes
        alone: int8/fp8 values (fp8 counts as floating point, and would be cast), float32 scales and
        biases. Device moves apply."""
        before = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, b in before.items():
            moved = self._buffers[name]
            if moved.dtype != b.dtype:
                self._buffers[name] = b.to(moved.device)
        return self

    def recorded_settings(self) -> dict:
        """Recorded in the state dict (RecordedSettings): the same tensors under another activation
        compute another layer."""
        return {"dtype": self.qdtype, "activation": self.activation}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse a checkpoint of another quantized format, also one saved without the settings record:
        load_state_dict would cast its int8 / fp8 values into this module's type (copy_), silently
        turning them into garbage against their scales.
        Nothing is loaded then, and load_state_dict raises naming the buffer and both formats."""
        bad = []
        for name in ("w1_q", "w2_q"):
            key, own = prefix + name, self._buffers.get(name)
            theirs = state_dict.get(key)
            if isinstance(theirs, torch.Tensor) and own is not None and theirs.dtype != own.dtype:
                fmt = _QNAME_OF_STORAGE.get(theirs.dtype, str(theirs.dtype).replace("torch.", ""))
                bad.append(f"{key} holds {fmt} values ({theirs.dtype}), but this QuantizedFFN stores {self.qdtype} "
                           f"({own.dtype}); build the module with dtype={fmt!r} to load this checkpoint")
        if bad:
            error_msgs.extend(bad)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] float32/float16/bfloat16 -> [..., O] in x's dtype."""
        check_tensor("x", x)
        check_same_device(x=x, w1_q=self.w1_q)
        x2, lead = flatten_tokens("x", x, self.input_width)
        x_q, x_s = quantize(x2, self.qdtype, "row", backend=self.backend)
        h_q, h_s = scaled_matmul(x_q, x_s, self.w1_q, self.w1_scale, self.b1, self.activation, x.dtype,
                                 quantize_output=self.qdtype, backend=self.backend)
        y = scaled_matmul(h_q, h_s, self.w2_q, self.w2_scale, self.b2, None, x.dtype, backend=self.backend)
        return y.reshape(*lead, self.output_width)

    def gemm_path(self, tokens: int = 128) -> str:
        """Which scaled_matmul path the GEMMs take for a batch of `tokens` tokens on this module's
        device ('triton', 'torch-int8-exact', 'torch-int_mm' or 'torch-fp8-upcast')."""
        a = torch.empty(tokens, self.input_width, dtype=self.w1_q.dtype, device=self.w1_q.device)
        return scaled_matmul_path(a, self.w1_q, backend=self.backend)

    def weight_memory(self) -> dict:
        """Bytes of the quantized weights (values, scales, biases) against the float module's parameters.

        Returns {"quantized_bytes", "float_bytes", "ratio"} with ratio = quantized / float (about
        0.25 against float32 weights, 0.5 against bf16, for wide layers). float_bytes is None (and
        ratio None) when the module was not built by from_float.
        """
        q_bytes = sum(b.numel() * b.element_size() for b in (self.w1_q, self.w1_scale, self.b1,
                                                              self.w2_q, self.w2_scale, self.b2) if b is not None)
        ratio = None if not self.float_weight_bytes else q_bytes / self.float_weight_bytes
        return {"quantized_bytes": q_bytes, "float_bytes": self.float_weight_bytes, "ratio": ratio}

    def extra_repr(self) -> str:
        return (f"{self.input_width} -> {self.hidden_width} -> {self.output_width}, dtype={self.qdtype}, "
                f"activation={self.activation}, backend={self.backend!r}")
