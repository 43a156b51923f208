"""Backend choice, input validation and small shared helpers for every public op.

Backends (DESIGN.md): "auto" picks the Triton kernel for CUDA/ROCm tensors when Triton imports and
the torch fallback otherwise; "triton" forces the kernel (on CPU tensors only under the interpreter,
TRITON_INTERPRET=1); "torch" forces the fallback. The environment variable TRITONLAB_BACKEND sets
what "auto" means, so a whole program can be switched without code changes; an explicit
backend="triton"/"torch" argument always wins over it.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._triton import ACTIVATION_CODES, HAS_TRITON, interpreting

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)


@dataclass(frozen=True)
class CompileTarget:
    """The GPU that kernels are being compiled for while nothing runs (tritonlab compile-check)."""

    arch: int  # compute capability as major * 10 + minor, e.g. 90
    #: shared memory one block may opt into, bytes
    shared_memory: int

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.arch, 10)


_compile_target: Optional[CompileTarget] = None


def set_compile_target(target: Optional[CompileTarget]) -> None:
    """Enter (or leave, with None) compile-only mode. Set by tritonlab.autotune.offline, which also
    switches Triton to compiling without launching: then backend="triton" accepts CPU tensors, and
    the launchers' device queries (fp8 support, shared memory) answer for `target`. Kernel outputs
    are not computed in this mode."""
    global _compile_target
    _compile_target = target


def compile_target() -> Optional[CompileTarget]:
    """The compile-only target, or None (the normal case: kernels run)."""
    return _compile_target


_SMEM_PER_BLOCK: dict[int, int] = {}


def shared_memory_per_block(device: torch.device) -> Optional[int]:
    """Shared memory one block may opt into on `device`, bytes: the compile target's in compile-only
    mode, the CUDA device's (cached per device), else None (CPU tensors: the interpreter has no limit)."""
    if _compile_target is not None:
        return _compile_target.shared_memory
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_PER_BLOCK:
        props = torch.cuda.get_device_properties(idx)
        _SMEM_PER_BLOCK[idx] = int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)
    return _SMEM_PER_BLOCK[idx]


def fit_pipelined_tiles(cfg: dict, element_bytes: int, device: torch.device) -> dict:
    """A matmul config (BLOCK_M, BLOCK_N, BLOCK_K, num_stages) whose pipelined A and B tiles fit the
    device's shared memory per block: fewer stages (down to 2), then narrower K tiles (down to 32).
    Defaults sized for an H100 (227 KB) would not launch on a 99 KB part (Ada, consumer Ampere)."""
    limit = shared_memory_per_block(device)
    if limit is None:
        return cfg
    limit -= 4096  # headroom for the kernel's own scratch (epilogue conversions, reductions)
    cfg = dict(cfg)

    def need(c: dict) -> int:
        return (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * c["num_stages"] * element_bytes

    while need(cfg) > limit and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while need(cfg) > limit and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] //= 2
    return cfg


def check_backend(backend: object) -> str:
    """The backend name, or a ValueError naming `backend` (modules check it when they are built)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return "triton" or "torch" for an op whose tensors live on `device`."""
    check_backend(backend)
    if backend == "auto":
        backend = os.environ.get("TRITONLAB_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"TRITONLAB_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs Triton, which is not installed here")
        if device.type != "cuda" and not interpreting() and _compile_target is None:
            raise ValueError(
                f"backend='triton' got tensors on {device}; Triton kernels run on CUDA/ROCm tensors, "
                "or on CPU tensors under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
    return backend


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """Raise TypeError/ValueError naming `name` unless `t` is a tensor of the wanted rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise ValueError naming `name` unless t.shape == expected."""
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_same_dtype(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    """TypeError naming the tensor unless every given tensor (None skipped) has x's dtype."""
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; pass x, weights and biases in one dtype")


def check_optional(name: str, t: torch.Tensor | None, expected: Sequence[int]) -> None:
    """An optional float tensor (a bias): None, or of exactly the expected shape."""
    if t is not None:
        check_tensor(name, t)
        check_shape(name, t, expected)


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) on one device; returns it. The error names the odd one out."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put all inputs on one device")
    return first.device


def check_activation(activation: str | None, allowed: Iterable[str | None] = ("relu", "gelu", "silu", "gelu_tanh", None, "none", "identity")) -> int:
    """Validate an activation name and return its kernel code."""
    allowed = tuple(allowed)
    if activation not in allowed or activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")
    return ACTIVATION_CODES[activation]


def torch_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The torch version of the kernels' activation epilogue (same names, same math)."""
    if activation in (None, "none", "identity"):
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "gelu":  # x * Phi(x) through erfc: F.gelu's 1 + erf(.) loses the tail x < -3
        return x * (0.5 * torch.special.erfc(x * -0.7071067811865476))
    if activation == "gelu_tanh":  # 0.5 (1 + tanh(u)) = sigmoid(2u), no cancellation in the tail
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    if activation == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {activation!r}")


def activation_and_grad(z: torch.Tensor, name: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(z), act'(z)) in torch, for the backward formulas of every family (the same math as
    torch_activation); the derivative is None for the identity."""
    if name in (None, "none", "identity"):
        return z, None
    if name == "relu":
        return F.relu(z), (z > 0).to(z.dtype)
    if name == "silu":
        s = torch.sigmoid(z)
        return z * s, s * (1 + z * (1 - s))
    if name == "gelu":
        cdf = 0.5 * torch.special.erfc(z * -0.7071067811865476)
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
    if name == "gelu_tanh":
        c = 0.7978845608028654
        s = torch.sigmoid(2 * c * (z + 0.044715 * z * z * z))
        # past |z| = 30, s (1 - s) is exactly 0 in every dtype; unclamped, z * z overflows float16 past
        # |z| ~ 700 (the CUDA fallback's dtype) and 0 * inf made the gradient NaN
        zc = z.clamp(-30, 30)
        return z * s, s + 2 * c * s * (1 - s) * zc * (1 + 3 * 0.044715 * zc * zc)
    raise ValueError(f"unknown activation {name!r}")


def is_int(v: object) -> bool:
    """An integer for a size argument: Python and numpy integers, not bools (True is no width)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def check_width(name: str, n: int, what: str) -> None:
    """ValueError naming the argument when a feature width is 0 (a layer of no features means nothing)."""
    if n < 1:
        raise ValueError(f"{name} must have {what} >= 1, got {n}")


def check_features(name: str, x: torch.Tensor) -> None:
    """ValueError naming `name` unless x is [..., D] with D >= 1 (not 0-d, no empty feature dim)."""
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim [..., D], got a 0-d tensor")
    check_width(name, x.shape[-1], "a last dim (features) D")


def flatten_tokens(name: str, x: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """[..., D] -> ([T, D] contiguous, leading shape). Checks the last dim against `width` if given."""
    check_features(name, x)
    if width is not None and x.shape[-1] != width:
        raise ValueError(f"{name} has last dim {x.shape[-1]}, expected {width}")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def empty_result(shape: Sequence[int], like: torch.Tensor, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """Zeros of `shape` (an op's output for a batch without elements) in like's dtype and device,
    still joined to the autograd graph of `inputs` (None skipped, complex ones through their real
    part): a training step on an empty batch then gives them zero gradients instead of failing in
    backward."""
    y = like.new_zeros(tuple(shape))
    for t in inputs:
        if t is not None and t.requires_grad:
            y = y + (t.real if t.is_complex() else t).sum().to(y.dtype) * 0
    return y


#: dot tiles with fewer elements run with at most 4 warps, in every family: Triton 3.6 on an H100
#: returned NaNs for dft_axis_kernel's [64, 16] tiles with 8 warps (fine with 2 or 4, and at twice
#: the width), and 256 threads have under 8 elements each there anyway
SMALL_TILE = 2048


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. Not triton.cdiv: in Triton 3.9 that is a ConstexprFunction,
    about 5 us per host call, paid by every launch."""
    return -(-a // b)


#: CPU temporaries up to this many bytes are kept between calls (see cpu_workspace)
_WORKSPACE_MAX_BYTES = 64 << 20
_workspace_cache = threading.local()


def cpu_workspace(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized buffer for a temporary that never leaves its function, reused across calls
    (per thread and slot) on the CPU: fresh pages cost a fault each on first touch (measured ~2 us
    per 4 KB page on the CI VM, thousands a call for a 16 MB temporary), more than the work on
    them. Other devices and large shapes get a plain torch.empty."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel * torch.empty((), dtype=dtype).element_size() > _WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    cache = _workspace_cache.__dict__.setdefault("buffers", {})
    buf = cache.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first made under torch.inference_mode(): an inference tensor
        # could not be written by the calls made outside it later
        with torch.inference_mode(False):
            buf = cache[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


# Tests set this (tritonlab.kernels._backend.POISON_OUTPUTS = True) so that every launcher allocates
# its outputs filled with NaN (floats) or the dtype's most negative value (ints: never a valid leaf,
# index or int8 quantized value): an element a kernel forgets to write then fails the reference check
# instead of passing on leftover memory.
POISON_OUTPUTS = False


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs, poisoned (NaN / integer minimum) when POISON_OUTPUTS is set."""
    out = torch.empty(tuple(shape), dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min)
    return out


def dispatch(op, impl, *args, needs_autograd: bool = False):
    """Call a registered torch.library custom op `op`, or its implementation `impl` directly.

    The dispatcher is needed while torch.compile traces (so the graph holds the op as one node) and
    when autograd must record the op's backward; otherwise its Python overhead (about 40 us a call,
    measured on the CPU machine) is pure launch latency for decode-size problems, so eager calls go
    straight to the implementation. Same arguments, same results either way. Meta tensors (shape
    inference, a model built on the meta device) go through the op too: its fake implementation
    gives the shapes, where a kernel or a fallback would try to read data they do not have.
    """
    if torch.compiler.is_compiling() or (isinstance(args[0], torch.Tensor) and args[0].is_meta):
        return op(*args)
    if needs_autograd and torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return op(*args)
    return impl(*args)


class RecordedSettings:
    """Mixin for an nn.Module whose constructor settings change what its tensors compute (a mixer's
    seq_len, a quantized FFN's activation): they travel in the state dict (`_extra_state`), and
    load_state_dict refuses a checkpoint made with other settings, naming the setting and both
    values, and loads nothing into the module (nor into its submodules). Without the record, the
    same tensors would load under another setting and compute something else. Checkpoints saved
    without the record (before it existed, or by hand) load as before, strict or not; to load
    tensors under other settings on purpose, drop the `_extra_state` keys from the dict.

    The record is a uint8 tensor holding the settings as UTF-8 JSON, not a dict: code that treats
    every state-dict value as a tensor (EMA copies, safetensors, `{k: v.to(...)}`) keeps working,
    and a float cast of it still decodes (bytes are exact integers in bf16 and fp16).
    """

    def recorded_settings(self) -> dict:
        """The settings to record, {name: str / int / None}."""
        raise NotImplementedError

    def get_extra_state(self) -> torch.Tensor:
        text = json.dumps(self.recorded_settings(), sort_keys=True)
        return torch.tensor(list(text.encode()), dtype=torch.uint8)

    def set_extra_state(self, state: object) -> None:
        """Nothing to set: _load_from_state_dict has compared the record with this module's settings."""

    @staticmethod
    def _decode_settings(record: object) -> Optional[dict]:
        """The settings in a record (None when there is no readable one: meta, or not ours)."""
        if not isinstance(record, torch.Tensor) or record.is_meta or record.dim() != 1 or record.is_complex():
            return None
        try:
            found = json.loads(bytes(record.detach().cpu().double().round().to(torch.uint8).tolist()).decode())
        except (ValueError, UnicodeDecodeError):
            return None
        return found if isinstance(found, dict) else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        theirs = self._decode_settings(state_dict.get(key))
        if theirs is not None:
            ours = self.recorded_settings()
            bad = [f"{key} records {name}={theirs[name]!r}, but this {type(self).__name__} has {name}={value!r}: "
                   f"build it with {name}={theirs[name]!r} to load this checkpoint (or drop the _extra_state "
                   f"keys to load the tensors anyway)"
                   for name, value in ours.items() if name in theirs and theirs[name] != value]
            if bad:
                error_msgs.extend(bad)
                # load_state_dict goes on into the submodules with this dict (its own copy, made to be
                # edited here): hand them their current values, a no-op load, so nothing here changes
                own = self.state_dict(prefix=prefix, keep_vars=True)  # type: ignore[attr-defined]
                for k in state_dict:
                    if k in own and k != key:
                        state_dict[k] = own[k]
                return
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[misc]
                                      unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys[n_missing:]:
            missing_keys.remove(key)  # a checkpoint from before the record: nothing to compare
