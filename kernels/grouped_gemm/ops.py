"""Public grouped-GEMM ops: validation, backend dispatch, Triton launchers, autograd, torch.library registration.

`gather_matmul_scatter` and `leaf_mlp` are `torch.library.custom_op`s (`tritonlab::gather_matmul_scatter`,
`tritonlab::leaf_mlp`) with fake implementations and autograd formulas; their backward passes are
custom ops too (`..._backward`), so `torch.compile(fullgraph=True)` holds forward and backward as
opaque nodes. The Python wrappers validate inputs (naming the argument in every error), flatten
leading dims and normalize indices to int64 [T, k]; the custom ops pick the backend and run.

Index range check: indices outside [0, G) raise ValueError. On CUDA this reads one min/max pair
on the host (a sync); it is skipped while torch.compile traces (torch.compiler.is_compiling())
and while a CUDA graph is being captured (a sync would break the capture); meta tensors hold no ids
(their calls run the fake implementation, which gives the output shape). The Triton path stays
memory-safe without it: the device grouping puts out-of-range ids in no tile, so no kernel ever
reads through them (their output rows are then undefined). That is why the Triton path reads the
pair only after its kernels are queued (`_IndexBounds`): the min/max and their copy to pinned host
memory go first in the stream, so the wait covers the work queued before the call, not the call's
own kernels, and the host's next work overlaps them (checked first, the GPU would sit idle through
the call's whole host work, which at decode sizes is of the order of its GPU work). The torch
backend, whose indexing ops would fault on such an id, checks before it runs.
"""
from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import torch

from .._accuracy import rel_error, tolerance
from .._backend import (INDEX_DTYPES, SMALL_TILE, activation_and_grad, cdiv, check_activation, check_backend,
                        check_features, check_optional, check_same_device, check_same_dtype, check_tensor,
                        check_width, dispatch, fit_pipelined_tiles, flatten_tokens, new_output, next_pow2,
                        resolve_backend)
from .._triton import ACTIVATION_CODES, interpreting
from .._tuning import TunableKernel, lookup_config, register
from . import fallback, reference
from .fallback import hidden_backward, hidden_forward
from .grouping import DIRECT_MAX_GROUPS, DIRECT_MAX_SLOTS, CountedGrouping, DeviceGrouping
from .triton_kernels import grouped_gemm_kernel, grouped_wgrad_kernel, leaf_mlp_fused_kernel, slot_sum_kernel

Tensor = torch.Tensor

GMS_ACTIVATIONS = ("relu", "gelu", "silu", "gelu_tanh", None, "none", "identity")
LEAF_ACTIVATIONS = GMS_ACTIVATIONS + ("swiglu",)


# ----------------------------------------------------------------------------- validation

def _check_x_and_group_weight(x: Tensor, name: str, w: Tensor) -> tuple[int, int, int]:
    """x [..., D] and a per-group weight [G >= 1, D, N]; returns (G, D, N)."""
    check_tensor("x", x)
    check_tensor(name, w, ndim=3)
    check_features("x", x)
    g, d, n = w.shape
    if g == 0:
        raise ValueError(f"{name} must have at least one group ({name}.shape[0] >= 1)")
    check_width(name, n, "an output width (dim 2)")
    if d != x.shape[-1]:
        raise ValueError(f"{name} must be [G, D, N] with D = x.shape[-1] = {x.shape[-1]}, got {tuple(w.shape)}")
    return g, d, n


class _IndexBounds:
    """min and max of int64 indices, on their way to the host (module docstring); `check` raises
    for ids outside [0, G). None of it while torch.compile traces or a CUDA graph is captured."""

    def __init__(self, idx: Tensor):
        self._ready = None
        self._host = None
        if (idx.numel() == 0 or idx.is_meta or torch.compiler.is_compiling()
                or (idx.is_cuda and torch.cuda.is_current_stream_capturing())):
            return  # (meta tensors hold no ids to check)
        bounds = torch.stack(list(torch.aminmax(idx)))
        if idx.is_cuda:
            self._host = torch.empty(2, dtype=bounds.dtype, pin_memory=True).copy_(bounds, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = bounds

    @property
    def pending(self) -> bool:
        """Whether there is anything to check (not under tracing or capture, not empty)."""
        return self._host is not None

    def check(self, num_groups: int) -> None:
        if not self.pending:
            return
        if self._ready is not None:
            self._ready.synchronize()  # the one host sync on CUDA (documented)
        lo, hi = self._host.tolist()
        if lo < 0 or hi >= num_groups:
            bad = lo if lo < 0 else hi
            raise ValueError(f"indices must lie in [0, G) for the G = {num_groups} groups of the weights, got {bad}")


def _prepare_indices(indices: object, lead: tuple[int, ...], t: int) -> tuple[Tensor, _IndexBounds]:
    """indices [*lead] / [*lead, k] / [T] / [T, k] -> (int64 [T, k], its bounds to check; see the
    module docstring)."""
    check_tensor("indices", indices, dtypes=INDEX_DTYPES)
    shape = tuple(indices.shape)
    if shape == lead or shape == (t,):
        k = 1
    elif len(shape) >= 1 and (shape[:-1] == lead or (len(shape) == 2 and shape[0] == t)):
        k = shape[-1]
    else:
        raise ValueError(f"indices must have shape [T] or [T, k] (or x's leading dims {lead} plus k) with T = {t}, "
                         f"got {shape}")
    if k < 1:
        raise ValueError(f"indices must give at least one group per token (k >= 1), got shape {shape}")
    idx = indices.reshape(t, k).to(torch.int64).contiguous()
    return idx, _IndexBounds(idx)


def _dispatch_checked(op, impl, x: Tensor, bounds: _IndexBounds, num_groups: int, backend: str, *args) -> Tensor:
    """Run the op on the range-checked indices: the Triton path checks after its launches, the torch
    path before (module docstring). Meta inputs hold no ids: nothing to check, and dispatch hands
    them to the op's fake implementation."""
    after = bounds.pending and resolve_backend(backend, x.device) == "triton"
    if not after:
        bounds.check(num_groups)
    y = dispatch(op, impl, x, *args, backend, needs_autograd=True)
    if after:
        bounds.check(num_groups)
    return y


def _prepare_route_weights(rw: object, indices_shape: tuple[int, ...], t: int, k: int) -> Optional[Tensor]:
    if rw is None:
        return None
    check_tensor("route_weights", rw)
    if tuple(rw.shape) not in (indices_shape, (t, k)) and not (k == 1 and tuple(rw.shape) == (t,)):
        raise ValueError(f"route_weights must have the shape of indices {indices_shape}, got {tuple(rw.shape)}")
    return rw.reshape(t, k).contiguous()


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------- configs

def _tile_height(m: int, g: int, tallest: int) -> int:
    """Default BLOCK_M for m slots over g groups: a little taller than the mean group. With random
    routing about half the groups exceed the mean, and a group spilling into a second tile reads its
    weights twice (decode sizes are bound by exactly those weight reads)."""
    per_group = 1.25 * m / max(g, 1)
    bm = 16 if per_group <= 16 else 32 if per_group <= 32 else 64 if per_group <= 96 else 128
    return min(bm, tallest, max(16, next_pow2(m)))


def _is_decode_plan(t: int, k: int, g: int) -> bool:
    """Decode sizes take the direct plan: no grouping at all (see grouping.py)."""
    return t * k <= DIRECT_MAX_SLOTS and g <= DIRECT_MAX_GROUPS


def _gemm_default(shape) -> dict:
    m, g, d, n, gated = shape["T"] * shape["k"], shape["G"], shape["D"], shape["N"], shape.get("gated", 0)
    bm = _tile_height(m, g, 128)
    bn = min(64 if gated else 128, max(16, next_pow2(n)))
    bk = min(64, max(16, next_pow2(d)))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
            "num_warps": 8 if bm * bn * (1 + gated) >= 128 * 128 else 4, "num_stages": 3}


def _gemm_space(shape) -> list[dict]:
    m, d, n, gated = shape["T"] * shape["k"], shape["D"], shape["N"], shape.get("gated", 0)
    out = []
    small = (16,)  # 16-wide blocks only where the problem is that narrow (else the space would be empty)
    for bm, bn, bk, nw, ns in itertools.product((16, 32, 64, 128), (small if n <= 16 else ()) + (32, 64, 128, 256),
                                                (small if d <= 16 else ()) + (32, 64, 128), (4, 8), (2, 3, 4)):
        if bm > max(16, next_pow2(m)) or bn > max(16, next_pow2(n)) or bk > max(16, next_pow2(d)):
            continue
        if bm * bn * (1 + gated) > 128 * 256 or (bm * bk + bk * bn * (1 + gated)) * 2 * ns > 200 * 1024:
            continue  # register tiles beyond this spill; shared memory beyond this does not fit (16-bit operands)
        if nw == 8 and bm * bn < SMALL_TILE:
            continue  # (see SMALL_TILE)
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": nw, "num_stages": ns})
    return out


def _wgrad_default(shape) -> dict:
    per_group = shape["T"] * shape["k"] / max(shape["G"], 1)
    return {"BLOCK_D": min(64, max(16, next_pow2(shape["D"]))), "BLOCK_N": min(64, max(16, next_pow2(shape["N"]))),
            "BLOCK_R": 64 if per_group >= 256 else 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def _wgrad_space(shape) -> list[dict]:
    out = []
    small = (16,)  # as in _gemm_space
    for bd, bn, br, nw, ns in itertools.product((small if shape["D"] <= 16 else ()) + (32, 64, 128),
                                                (small if shape["N"] <= 16 else ()) + (32, 64, 128),
                                                (16, 32, 64), (4, 8), (2, 3, 4)):
        if bd > max(16, next_pow2(shape["D"])) or bn > max(16, next_pow2(shape["N"])):
            continue
        if (bd * br + br * bn) * 2 * ns > 200 * 1024 or (nw == 8 and bd * bn < SMALL_TILE):
            continue
        out.append({"BLOCK_D": bd, "BLOCK_N": bn, "BLOCK_R": br, "GROUP_M": 8, "num_warps": nw, "num_stages": ns})
    return out


#: widest hidden tile (H, or 2H for swiglu, rounded up to a power of two) the fused leaf MLP keeps in registers
FUSED_MAX_HIDDEN = 128


def fused_leaf_fits(h: int, gated: bool) -> bool:
    """Whether leaf_mlp's hidden layer is narrow enough for the one-launch fused kernel."""
    return max(16, next_pow2(h)) * (2 if gated else 1) <= FUSED_MAX_HIDDEN


def _fused_hidden_tile(shape) -> int:
    """Columns of the fused leaf kernel's hidden tile: H rounded up to a power of two, twice for swiglu."""
    return max(16, next_pow2(shape["H"])) * (1 + shape.get("gated", 0))


def _fused_leaf_default(shape) -> dict:
    m, g, d, o = shape["T"] * shape["k"], shape["G"], shape["D"], shape["N"]
    # a 128-column hidden tile next to the output tile needs ~250 registers a thread at 4 warps
    # (ptxas, bf16, H = 128 or swiglu H = 64): 8 warps halve that, unless a dot tile is small (SMALL_TILE)
    bm, bn, bh = _tile_height(m, g, 64), min(128, max(16, next_pow2(o))), _fused_hidden_tile(shape)
    return {"BLOCK_M": bm, "BLOCK_K": min(64, max(16, next_pow2(d))), "BLOCK_N": bn,
            "num_warps": 8 if bh >= 128 and bm * min(bh, bn) >= SMALL_TILE else 4, "num_stages": 3}


def _fused_leaf_space(shape) -> list[dict]:
    m, d, o = shape["T"] * shape["k"], shape["D"], shape["N"]
    bh = _fused_hidden_tile(shape)
    out = []
    small = (16,)  # 16-wide blocks only where the problem is that narrow
    for bm, bk, bn, nw, ns in itertools.product((16, 32, 64, 128), (small if d <= 16 else ()) + (32, 64, 128),
                                                (small if o <= 16 else ()) + (32, 64, 128, 256), (4, 8), (2, 3, 4)):
        if bm > max(16, next_pow2(m)) or bk > max(16, next_pow2(d)) or bn > max(16, next_pow2(o)):
            continue
        if bm * (bh + bn) > 128 * 256 // (2 if nw == 4 else 1):
            continue  # register tiles beyond this spill (fp32 accumulators of the hidden and output tiles)
        if nw == 8 and bm * min(bh, bn) < SMALL_TILE:
            continue  # (see SMALL_TILE)
        if _fused_leaf_smem(shape, {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "num_stages": ns}, 2) > 200 * 1024:
            continue  # does not fit in shared memory even with 16-bit operands
        out.append({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "num_warps": nw, "num_stages": ns})
    return out


def _fused_leaf_smem(shape, cfg, element_bytes: int) -> int:
    """Shared memory of the fused leaf kernel: pipelined x and w1 tiles, and the w2 tile (double-buffered)."""
    bh = _fused_hidden_tile(shape)
    bm, bk, bn = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_N"]
    return ((bm * bk + bk * bh) * cfg.get("num_stages", 2) + 2 * bh * bn) * element_bytes


def _sum_default(shape) -> dict:
    return {"BLOCK_T": 16, "BLOCK_N": min(256, max(16, next_pow2(shape["N"]))), "num_warps": 4}


def _sum_space(shape) -> list[dict]:
    return [{"BLOCK_T": bt, "BLOCK_N": bn, "num_warps": nw}
            for bt, bn, nw in itertools.product((4, 8, 16, 32), (64, 128, 256, 512), (2, 4, 8))
            if bn <= max(64, next_pow2(shape["N"])) and bt * bn <= 8192]


# ----------------------------------------------------------------------------- Triton launchers

def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or interpreting()


def _gemm(grouping: DeviceGrouping, a: Tensor, w: Tensor, *, gather_a: bool, scatter: bool,
          bias: Optional[Tensor] = None, rw: Optional[Tensor] = None, act: int = 0, swiglu: bool = False,
          out_dtype: Optional[torch.dtype] = None, config: Optional[dict] = None) -> Tensor:
    """Grouped GEMM over the sorted rows: row r (group g) -> epilogue(A_row @ w[g]).

    A_row is a[token of r] (gather_a) or a[r]; w is [G, K, Nw] with any strides (a transposed view
    works); swiglu splits Nw into gate and up halves. Returns [M, N]: rows in slot order (scatter)
    or in sorted order.
    """
    m, kdim = grouping.num_slots, a.shape[1]
    n = w.shape[2] // 2 if swiglu else w.shape[2]
    out = new_output((m, n), out_dtype or a.dtype, a.device)
    cfg = dict(config or _gemm_config(grouping.num_tokens, grouping.topk, a, w, swiglu))
    # fp32 operands stay fp32 in shared memory: the default 128-row tiles need ~128 KB then, more
    # than a 99 KB GPU (L4, consumer parts) has (compile-check --arch 89); every config is fitted,
    # as in quantized/ops.py
    cfg = fit_pipelined_tiles(cfg, a.element_size(), a.device)
    if grouping.direct:
        cfg["BLOCK_M"] = max(16, next_pow2(m))
        tile_group = tile_row = sorted_slot = offsets = grouping.ids
        rows_grid = grouping.num_groups
    else:
        tile_group, tile_row = grouping.tiles(cfg["BLOCK_M"])
        sorted_slot, offsets, rows_grid = grouping.sorted_slot, grouping.offsets, tile_group.shape[0]
    grid = (rows_grid * cdiv(n, cfg["BLOCK_N"]),)
    grouped_gemm_kernel[grid](
        a, w, a if bias is None else bias, a if rw is None else rw, out,
        sorted_slot, tile_group, tile_row, offsets, grouping.ids,
        grouping.num_groups, m, rows_grid, n, kdim, n,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        0 if bias is None else bias.stride(0), 0 if bias is None else bias.stride(1), out.stride(0), out.stride(1),
        TOPK=grouping.topk, GATHER_A=gather_a, SCATTER_OUT=scatter, HAS_BIAS=bias is not None,
        HAS_RW=rw is not None, ACT=act, SWIGLU=swiglu, UPCAST_DOT=_upcast(a.dtype), DIRECT=grouping.direct,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _leaf_mlp_fused(grouping: CountedGrouping, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                    b2: Optional[Tensor], activation: Optional[str], rw: Optional[Tensor] = None,
                    config: Optional[dict] = None) -> Tensor:
    """Both leaf GEMMs in one launch (fused_leaf_fits); returns [M, O] per-slot rows in slot order."""
    swiglu = activation == "swiglu"
    h, o = w2.shape[1], w2.shape[2]
    out = new_output((grouping.num_slots, o), x.dtype, x.device)
    cfg = config or _fused_leaf_config(grouping.num_tokens, grouping.topk, x, w1, w2, swiglu)
    tile_group, tile_row = grouping.tiles(cfg["BLOCK_M"])
    leaf_mlp_fused_kernel[(tile_group.shape[0],)](
        x, w1, x if b1 is None else b1, w2, x if b2 is None else b2, x if rw is None else rw, out,
        grouping.sorted_slot, tile_group, tile_row, grouping.offsets,
        grouping.num_groups, x.shape[1], h, o,
        x.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), 0 if b1 is None else b1.stride(0),
        w2.stride(0), w2.stride(1), w2.stride(2), 0 if b2 is None else b2.stride(0), out.stride(0),
        TOPK=grouping.topk, HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_RW=rw is not None,
        ACT=0 if swiglu else _act_code(activation), SWIGLU=swiglu, UPCAST_DOT=_upcast(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_H=max(16, next_pow2(h)), BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _fused_leaf_config(t: int, k: int, x: Tensor, w1: Tensor, w2: Tensor, swiglu: bool) -> dict:
    shape = {"T": t, "k": k, "G": w1.shape[0], "D": x.shape[1], "H": w2.shape[1], "N": w2.shape[2],
             "gated": int(swiglu)}
    return lookup_config("leaf_mlp_fused", shape, x.dtype, x.device)


def _slot_sum(buf: Tensor, t: int, k: int, out_dtype: torch.dtype, config: Optional[dict] = None) -> Tensor:
    """[T * k, N] per-slot rows -> [T, N] sums over each token's k slots, in a fixed order."""
    n = buf.shape[1]
    out = new_output((t, n), out_dtype, buf.device)
    cfg = config or lookup_config("grouped_slot_sum", {"T": t, "k": k, "N": n}, buf.dtype, buf.device)
    grid = (cdiv(t, cfg["BLOCK_T"]), cdiv(n, cfg["BLOCK_N"]))
    slot_sum_kernel[grid](buf, out, t, n, buf.stride(0), out.stride(0), TOPK=k,
                          BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
    return out


def _per_token(grouping: DeviceGrouping, buf: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Slot-ordered rows -> per-token rows (the k = 1 buffer already is)."""
    if grouping.topk == 1:
        return buf
    return _slot_sum(buf, grouping.num_tokens, grouping.topk, out_dtype)


def _wgrad(grouping: DeviceGrouping, a: Tensor, b: Tensor, *, gather_a: bool, gather_b: bool,
           rw: Optional[Tensor] = None, with_bias: bool = False, w_dtype: Optional[torch.dtype] = None,
           b_dtype: Optional[torch.dtype] = None, config: Optional[dict] = None) -> tuple[Tensor, Optional[Tensor]]:
    """dW [G, Da, Nb] = per group sum of A_row^T (rw * B_row); db [G, Nb] = sum of rw * B_row (with_bias)."""
    g, m = grouping.num_groups, grouping.num_slots
    da, nb = a.shape[1], b.shape[1]
    compact = g > m  # launch only for non-empty groups; the rest of dW is zeros
    alloc = (lambda s, dt: torch.zeros(s, dtype=dt, device=a.device)) if compact else \
        (lambda s, dt: new_output(s, dt, a.device))
    dw = alloc((g, da, nb), w_dtype or a.dtype)
    db = alloc((g, nb), b_dtype or b.dtype) if with_bias else None
    shape = {"T": grouping.num_tokens, "k": grouping.topk, "G": g, "D": da, "N": nb}
    cfg = config or lookup_config("grouped_wgrad", shape, a.dtype, a.device)
    blocks_d, blocks_n = cdiv(da, cfg["BLOCK_D"]), cdiv(nb, cfg["BLOCK_N"])
    launched = grouping.nonempty_groups().shape[0] if compact else g
    grouped_wgrad_kernel[(launched * blocks_d * blocks_n,)](
        a, b, a if rw is None else rw, dw, dw if db is None else db,
        grouping.sorted_slot, grouping.offsets, grouping.nonempty_groups() if compact else grouping.offsets,
        g, da, nb, blocks_d, blocks_n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        0 if db is None else db.stride(0), 0 if db is None else db.stride(1),
        TOPK=grouping.topk, GATHER_A=gather_a, GATHER_B=gather_b, HAS_RW=rw is not None, HAS_DB=with_bias,
        COMPACT=compact, UPCAST_DOT=_upcast(a.dtype),
        BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw, db


def _forward_plan(indices: Tensor, num_groups: int, block_m: Optional[int] = None,
                  state: Optional[Tensor] = None):
    """The grouping for a forward pass: direct (sort-free) for decode sizes, a counting sort otherwise
    (`block_m`: the first GEMM's tile height, planned in the same launch as the offsets; `state`:
    CountedGrouping's counts, already filled by the producer of the ids)."""
    if _is_decode_plan(*indices.shape, num_groups):
        return DeviceGrouping(indices, num_groups, direct=True)
    return CountedGrouping(indices, num_groups, state=state, block_m=block_m)


def _gemm_config(t: int, k: int, a: Tensor, w: Tensor, swiglu: bool) -> dict:
    """The grouped_gemm config for T tokens x k slots of rows of `a` times the per-group `w`."""
    n = w.shape[2] // 2 if swiglu else w.shape[2]
    shape = {"T": t, "k": k, "G": w.shape[0], "D": a.shape[1], "N": n, "gated": int(swiglu)}
    return lookup_config("grouped_gemm", shape, a.dtype, a.device)


def _sorted_to_slots(grouping: DeviceGrouping, v: Tensor) -> Tensor:
    """[M] values in sorted order -> [M] in slot order (a permutation: deterministic)."""
    return torch.empty_like(v).index_copy_(0, grouping.order, v)


def _act_code(activation: Optional[str]) -> int:
    return ACTIVATION_CODES[None if activation in ("none", "identity") else activation]


@torch.no_grad()
def gather_matmul_scatter_triton(x, weight, indices, bias, route_weights, activation) -> Tensor:
    cfg = _gemm_config(*indices.shape, x, weight, False)
    grouping = _forward_plan(indices, weight.shape[0], block_m=cfg["BLOCK_M"])
    rw = None if route_weights is None else route_weights.reshape(-1)
    y = _gemm(grouping, x, weight, gather_a=True, scatter=True, bias=bias, rw=rw, act=_act_code(activation),
              config=cfg)
    return _per_token(grouping, y, x.dtype)


@torch.no_grad()
def leaf_mlp_triton(x, indices, w1, b1, w2, b2, activation, route_weights=None, grouping_state=None) -> Tensor:
    """The leaf MLP on one grouping. Narrow hidden layers (fused_leaf_fits) run both GEMMs in one
    launch; wider ones run two, with the hidden layer [T*k, H] kept in sorted (grouped) order between
    them (in slot order for the direct decode plan, which has no sorted order). `grouping_state`:
    CountedGrouping.new_state with the counts of `indices` filled in by their producer (fff_forward's
    tree walk); used only by the sorted plans."""
    indices = indices.reshape(indices.shape[0], -1)
    swiglu = activation == "swiglu"
    rw = None if route_weights is None else route_weights.reshape(-1)
    h = w2.shape[1]
    if fused_leaf_fits(h, swiglu) and not _is_decode_plan(*indices.shape, w1.shape[0]):
        cfg = _fused_leaf_config(*indices.shape, x, w1, w2, swiglu)
        grouping = CountedGrouping(indices, w1.shape[0], state=grouping_state, block_m=cfg["BLOCK_M"])
        y = _leaf_mlp_fused(grouping, x, w1, b1, w2, b2, activation, rw, config=cfg)
        return _per_token(grouping, y, x.dtype)
    cfg = _gemm_config(*indices.shape, x, w1, swiglu)
    grouping = _forward_plan(indices, w1.shape[0], block_m=cfg["BLOCK_M"], state=grouping_state)
    hidden = _gemm(grouping, x, w1, gather_a=True, scatter=False, bias=b1, swiglu=swiglu,
                   act=0 if swiglu else _act_code(activation), config=cfg)
    y = _gemm(grouping, hidden, w2, gather_a=False, scatter=True, bias=b2, rw=rw)
    return _per_token(grouping, y, x.dtype)


@torch.no_grad()
def gather_matmul_scatter_backward_triton(dy, x, weight, indices, bias, route_weights, activation):
    grouping = DeviceGrouping(indices, weight.shape[0])
    rw = None if route_weights is None else route_weights.reshape(-1)
    drw = None
    if activation in (None, "none", "identity") and rw is None:
        dz, dz_gathered = dy, True  # dz_slot = dy_token: read dy through the gather, no [T*k, N] copy
    else:
        z = _gemm(grouping, x, weight, gather_a=True, scatter=False, bias=bias, out_dtype=torch.float32)
        a, da = activation_and_grad(z, activation)
        dz = dy.index_select(0, grouping.sorted_token).float()
        if rw is not None:
            drw = _sorted_to_slots(grouping, (a * dz).sum(1)).view(route_weights.shape).to(route_weights.dtype)
            dz *= rw.index_select(0, grouping.order).float()[:, None]
        if da is not None:
            dz *= da
        dz, dz_gathered = dz.to(x.dtype), False
    dx = _per_token(grouping, _gemm(grouping, dz, weight.transpose(1, 2), gather_a=dz_gathered, scatter=True), x.dtype)
    dw, db = _wgrad(grouping, x, dz, gather_a=True, gather_b=dz_gathered, with_bias=bias is not None,
                    w_dtype=weight.dtype, b_dtype=None if bias is None else bias.dtype)
    return dx, dw, db, drw


@torch.no_grad()
def leaf_mlp_backward_triton(dy, x, indices, w1, b1, w2, b2, route_weights, activation):
    grouping = DeviceGrouping(indices, w1.shape[0])
    rw = None if route_weights is None else route_weights.reshape(-1)
    u = _gemm(grouping, x, w1, gather_a=True, scatter=False, bias=b1, out_dtype=torch.float32)
    hidden = hidden_forward(u, activation)
    dh = _gemm(grouping, dy, w2.transpose(1, 2), gather_a=True, scatter=False, out_dtype=torch.float32)
    drw = None
    if rw is not None:  # d/d rw = <hidden @ w2 + b2, dy> = <hidden, dy @ w2^T> + <b2, dy>
        r = (hidden * dh).sum(1)
        if b2 is not None:
            r += _gemm(grouping, dy, b2.unsqueeze(2), gather_a=True, scatter=False, out_dtype=torch.float32)[:, 0]
        drw = _sorted_to_slots(grouping, r).view(route_weights.shape).to(route_weights.dtype)
        dh *= rw.index_select(0, grouping.order).float()[:, None]
    du = hidden_backward(dh, u, activation).to(x.dtype)
    dw2, db2 = _wgrad(grouping, hidden.to(x.dtype), dy, gather_a=False, gather_b=True, rw=rw,
                      with_bias=b2 is not None, w_dtype=w2.dtype, b_dtype=None if b2 is None else b2.dtype)
    dx = _per_token(grouping, _gemm(grouping, du, w1.transpose(1, 2), gather_a=False, scatter=True), x.dtype)
    dw1, db1 = _wgrad(grouping, x, du, gather_a=True, gather_b=False, with_bias=b1 is not None,
                      w_dtype=w1.dtype, b_dtype=None if b1 is None else b1.dtype)
    return dx, dw1, db1, dw2, db2, drw


# ----------------------------------------------------------------------------- custom ops

def _none_to_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _gms_impl(x: Tensor, weight: Tensor, indices: Tensor, bias: Optional[Tensor], route_weights: Optional[Tensor],
            activation: str, backend: str) -> Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[2])
    if resolve_backend(backend, x.device) == "triton":
        return gather_matmul_scatter_triton(x, weight, indices, bias, route_weights, activation)
    return fallback.gather_matmul_scatter_torch(x, weight, indices, bias, route_weights, activation)


_gms_op = torch.library.custom_op("tritonlab::gather_matmul_scatter", _gms_impl, mutates_args=())


@_gms_op.register_fake
def _(x, weight, indices, bias, route_weights, activation, backend):
    return x.new_empty(x.shape[0], weight.shape[2])


def _gms_backward_impl(grad: Tensor, x: Tensor, weight: Tensor, indices: Tensor, bias: Optional[Tensor],
                     route_weights: Optional[Tensor], activation: str,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        grads = (torch.zeros_like(x), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias),
                 None if route_weights is None else torch.zeros_like(route_weights))
    elif resolve_backend(backend, x.device) == "triton":
        grads = gather_matmul_scatter_backward_triton(grad, x, weight, indices, bias, route_weights, activation)
    else:
        grads = fallback.gather_matmul_scatter_backward_torch(grad, x, weight, indices, bias, route_weights, activation)
    dx, dw, db, drw = grads
    return dx, dw, _none_to_empty(db, weight), _none_to_empty(drw, x)


_gms_backward_op = torch.library.custom_op("tritonlab::gather_matmul_scatter_backward", _gms_backward_impl,
                                           mutates_args=())


@_gms_backward_op.register_fake
def _(grad, x, weight, indices, bias, route_weights, activation, backend):
    return (torch.empty_like(x), torch.empty_like(weight),
            weight.new_empty(0) if bias is None else torch.empty_like(bias),
            x.new_empty(0) if route_weights is None else torch.empty_like(route_weights))


def _gms_setup_context(ctx, inputs, output):
    x, weight, indices, bias, route_weights, activation, backend = inputs
    ctx.save_for_backward(x, weight, indices, bias, route_weights)
    ctx.activation, ctx.backend = activation, backend


def _gms_backward(ctx, grad):
    x, weight, indices, bias, rw = ctx.saved_tensors
    dx, dw, db, drw = _gms_backward_op(grad.contiguous(), x, weight, indices, bias, rw, ctx.activation, ctx.backend)
    return dx, dw, None, (None if bias is None else db), (None if rw is None else drw), None, None


_gms_op.register_autograd(_gms_backward, setup_context=_gms_setup_context)


def _leaf_mlp_impl(x: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                 route_weights: Optional[Tensor], activation: str, backend: str) -> Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, w2.shape[2])
    if resolve_backend(backend, x.device) == "triton":
        return leaf_mlp_triton(x, indices, w1, b1, w2, b2, activation, route_weights)
    return fallback.leaf_mlp_torch(x, indices, w1, b1, w2, b2, activation, route_weights)


_leaf_mlp_op = torch.library.custom_op("tritonlab::leaf_mlp", _leaf_mlp_impl, mutates_args=())


@_leaf_mlp_op.register_fake
def _(x, indices, w1, b1, w2, b2, route_weights, activation, backend):
    return x.new_empty(x.shape[0], w2.shape[2])


def _leaf_mlp_backward_impl(grad: Tensor, x: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                          b2: Optional[Tensor], route_weights: Optional[Tensor], activation: str,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        z = [None if t is None else torch.zeros_like(t) for t in (x, w1, b1, w2, b2, route_weights)]
        grads = tuple(z)
    elif resolve_backend(backend, x.device) == "triton":
        grads = leaf_mlp_backward_triton(grad, x, indices, w1, b1, w2, b2, route_weights, activation)
    else:
        grads = fallback.leaf_mlp_backward_torch(grad, x, indices, w1, b1, w2, b2, route_weights, activation)
    dx, dw1, db1, dw2, db2, drw = grads
    return dx, dw1, _none_to_empty(db1, w1), dw2, _none_to_empty(db2, w2), _none_to_empty(drw, x)


_leaf_mlp_backward_op = torch.library.custom_op("tritonlab::leaf_mlp_backward", _leaf_mlp_backward_impl,
                                                mutates_args=())


@_leaf_mlp_backward_op.register_fake
def _(grad, x, indices, w1, b1, w2, b2, route_weights, activation, backend):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(0) if b1 is None else torch.empty_like(b1),
            torch.empty_like(w2), w2.new_empty(0) if b2 is None else torch.empty_like(b2),
            x.new_empty(0) if route_weights is None else torch.empty_like(route_weights))


def _leaf_setup_context(ctx, inputs, output):
    x, indices, w1, b1, w2, b2, route_weights, activation, backend = inputs
    ctx.save_for_backward(x, indices, w1, b1, w2, b2, route_weights)
    ctx.activation, ctx.backend = activation, backend


def _leaf_backward(ctx, grad):
    x, indices, w1, b1, w2, b2, rw = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, drw = _leaf_mlp_backward_op(grad.contiguous(), x, indices, w1, b1, w2, b2, rw,
                                                        ctx.activation, ctx.backend)
    return (dx, None, dw1, None if b1 is None else db1, dw2, None if b2 is None else db2,
            None if rw is None else drw, None, None)


_leaf_mlp_op.register_autograd(_leaf_backward, setup_context=_leaf_setup_context)


# ----------------------------------------------------------------------------- public API

def gather_matmul_scatter(x: Tensor, weight: Tensor, indices: Tensor, bias: Optional[Tensor] = None,
                          route_weights: Optional[Tensor] = None, activation: Optional[str] = None,
                          *, backend: str = "auto") -> Tensor:
    """Grouped GEMM with the rows gathered by group id and the results scattered back, summed over k.

    Args:
        x: [..., D] float32/float16/bfloat16 tokens (T = prod of the leading dims).
        weight: [G, D, N], one matrix per group (leaf / expert), same dtype as x.
        indices: int [T, k] (or [T] for k = 1; x's leading dims may stand for T) group ids in [0, G).
        bias: optional [G, N].
        route_weights: optional float32/float16/bfloat16 [T, k] (the shape of indices; need not be x's
            dtype), 1 when None.
        activation: None | "relu" | "gelu" | "gelu_tanh" | "silu", applied before the route weight.
        backend: "auto" | "triton" | "torch" (see DESIGN.md).
    Returns:
        [..., N] in x's dtype: y[t] = sum_j rw[t, j] * act(x[t] @ weight[g] + bias[g]), g = indices[t, j],
        float32 accumulation. For k > 1 the sum runs in a fixed order (the same bits run to run).
        Differentiable in x, weight, bias and route_weights.

    Raises ValueError/TypeError naming the argument for wrong shapes, dtypes, devices, or indices
    outside [0, G) (a host sync on CUDA, after the Triton launches; skipped under torch.compile; see
    the module docstring).
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    g, d, n = _check_x_and_group_weight(x, "weight", weight)
    check_optional("bias", bias, (g, n))
    check_same_dtype(x, weight=weight, bias=bias)
    check_activation(activation, GMS_ACTIVATIONS)
    check_same_device(x=x, weight=weight, indices=indices if isinstance(indices, Tensor) else None,
                      bias=bias, route_weights=route_weights if isinstance(route_weights, Tensor) else None)
    x2, lead = flatten_tokens("x", x, d)
    t = x2.shape[0]
    idx, bounds = _prepare_indices(indices, lead, t)
    rw = _prepare_route_weights(route_weights, tuple(indices.shape), t, idx.shape[1])
    y = _dispatch_checked(_gms_op, _gms_impl, x2, bounds, g, backend, weight.contiguous(), idx, _contig(bias), rw,
                          activation or "none")
    return y.reshape(*lead, n)


def leaf_mlp(x: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
             activation: Optional[str] = "relu", route_weights: Optional[Tensor] = None,
             *, backend: str = "auto") -> Tensor:
    """The two-GEMM leaf / expert MLP over a grouping of tokens (FFF leaves, mixture of experts).

    Args:
        x: [..., D] float32/float16/bfloat16 tokens (T = prod of the leading dims).
        indices: int [T, k] (or [T] for k = 1; x's leading dims may stand for T) group ids in [0, G).
        w1: [G, D, H] (for "swiglu": [G, D, 2H], columns [0, H) the gate, [H, 2H) the up projection);
        b1: [G, H] ([G, 2H] for swiglu) or None; w2: [G, H, O]; b2: [G, O] or None. All in x's dtype.
        activation: "relu" | "gelu" | "gelu_tanh" | "silu" | "swiglu" | None. SwiGLU's hidden layer
            is silu(x @ w1[:, :, :H] + b1[:, :H]) * (x @ w1[:, :, H:] + b1[:, H:]).
        route_weights: optional float32/float16/bfloat16 [T, k] (the shape of indices; need not be x's
            dtype), 1 when None.
        backend: "auto" | "triton" | "torch".
    Returns:
        [..., O] in x's dtype: y[t] = sum_j rw[t, j] * (act(x[t] @ w1[g] + b1[g]) @ w2[g] + b2[g]),
        g = indices[t, j]; float32 accumulation; the Triton path keeps the hidden layer in x's dtype
        and in grouped order between the two GEMMs. Deterministic for k > 1. Differentiable in x,
        w1, b1, w2, b2 and route_weights.

    Raises ValueError/TypeError naming the argument for wrong shapes, dtypes, devices, or indices
    outside [0, G) (a host sync on CUDA, after the Triton launches; skipped under torch.compile).
    """
    check_backend(backend)  # also for empty inputs, which return before a backend is picked
    g, d, h1 = _check_x_and_group_weight(x, "w1", w1)
    check_tensor("w2", w2, ndim=3)
    if activation != "swiglu":
        check_activation(activation, LEAF_ACTIVATIONS)
    h, o = w2.shape[1], w2.shape[2]
    check_width("w2", o, "an output width O (dim 2)")
    if w2.shape[0] != g:
        raise ValueError(f"w2 must have G = {g} groups (w1.shape[0]), got {tuple(w2.shape)}")
    want_h1 = 2 * h if activation == "swiglu" else h
    if h1 != want_h1:
        what = "2H (gate and up halves) for swiglu" if activation == "swiglu" else "H"
        raise ValueError(f"w1 must have {what} = {want_h1} columns to match w2 [G, H={h}, O], got {tuple(w1.shape)}")
    check_optional("b1", b1, (g, h1))
    check_optional("b2", b2, (g, o))
    check_same_dtype(x, w1=w1, b1=b1, w2=w2, b2=b2)
    check_same_device(x=x, indices=indices if isinstance(indices, Tensor) else None, w1=w1, b1=b1, w2=w2, b2=b2,
                      route_weights=route_weights if isinstance(route_weights, Tensor) else None)
    x2, lead = flatten_tokens("x", x, d)
    t = x2.shape[0]
    idx, bounds = _prepare_indices(indices, lead, t)
    rw = _prepare_route_weights(route_weights, tuple(indices.shape), t, idx.shape[1])
    y = _dispatch_checked(_leaf_mlp_op, _leaf_mlp_impl, x2, bounds, g, backend, idx, w1.contiguous(), _contig(b1),
                          w2.contiguous(), _contig(b2), rw, activation or "none")
    return y.reshape(*lead, o)


def leaf_mlp_in_range(x: Tensor, leaf: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                      activation: Optional[str], backend: str) -> Tensor:
    """leaf_mlp for a caller that has validated the weights and whose ids are in [0, G) by
    construction (fff_forward's training path: leaves from the tree walk): x [T, D], leaf int [T].
    Skips the index range check, and with it the host sync it costs on CUDA."""
    idx = leaf.reshape(-1, 1).to(torch.int64).contiguous()
    return dispatch(_leaf_mlp_op, _leaf_mlp_impl, x, idx, w1.contiguous(), _contig(b1), w2.contiguous(), _contig(b2),
                    None, activation or "none", backend, needs_autograd=True)


# ----------------------------------------------------------------------------- tuning registry

#: (G, k, D, N, gated) of both GEMMs of the issue's speed targets: Mixtral-like, fine-grained, FFF leaves
_MODEL_GEMMS = [(8, 2, 4096, 14336, 1), (8, 2, 14336, 4096, 0), (64, 8, 2048, 1408, 1), (64, 8, 1408, 2048, 0),
                (256, 1, 768, 64, 0), (256, 1, 64, 768, 0)]


def _model_shapes(tokens) -> list[dict]:
    return [{"T": t, "k": k, "G": g, "D": d, "N": n, "gated": gated} for t in tokens for g, k, d, n, gated in _MODEL_GEMMS]


def _random_indices(t: int, k: int, g: int, gen: torch.Generator, device) -> Tensor:
    """[T, k] group ids per token (uniform routing), distinct where k <= G (a tuned shape may ask
    for more choices than groups: then ids repeat, which the ops allow)."""
    if k <= g <= 4096:
        return torch.rand(t, g, generator=gen, device=device).argsort(1)[:, :k].contiguous()
    return torch.randint(0, g, (t, k), generator=gen, device=device)


def _gemm_inputs(shape, dtype, device):
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    t, k, g, d, n, gated = shape["T"], shape["k"], shape["G"], shape["D"], shape["N"], shape.get("gated", 0)
    nw = n * (2 if gated else 1)

    def r(*size, scale=1.0, dt=dtype):
        return (scale * torch.randn(*size, generator=gen, device=device)).to(dt)

    idx = _random_indices(t, k, g, gen, device)
    inp = {"x": r(t, d), "w": r(g, d, nw, scale=d**-0.5), "b": r(g, nw, scale=0.1),
           "rw": torch.softmax(r(t, k, dt=torch.float32), 1), "idx": idx, "gated": bool(gated)}
    inp["grouping"] = DeviceGrouping(idx, g)
    return inp


def _gemm_run(inp, cfg):
    return _gemm(inp["grouping"], inp["x"], inp["w"], gather_a=True, scatter=True, bias=inp["b"], rw=inp["rw"].reshape(-1),
                 act=0 if inp["gated"] else ACTIVATION_CODES["relu"], swiglu=inp["gated"], config=cfg)


def _sample(n: int, count: int = 64) -> np.ndarray:
    """Up to `count` indices spread over range(n)."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).astype(np.int64))


def _f64(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64)


def _gemm_error(inp, out) -> float:
    """Per-slot outputs of sampled tokens and columns against float64 (no [T, G, D, N] gathers at
    model sizes), and no NaN/inf anywhere in the output."""
    if not torch.isfinite(out).all():
        return float("inf")
    k, n = inp["idx"].shape[1], out.shape[1]
    toks, cols = _sample(inp["x"].shape[0]), _sample(n)
    wcols = np.concatenate([cols, cols + n]) if inp["gated"] else cols
    idx = inp["idx"].cpu().numpy()
    x, rw = _f64(inp["x"][torch.from_numpy(toks).to(inp["x"].device)]), _f64(inp["rw"])[toks]
    wc = torch.from_numpy(wcols).to(inp["w"].device)
    ref = np.zeros((toks.size, k, cols.size))
    for g in np.unique(idx[toks]):
        w_g, b_g = _f64(inp["w"][int(g)].index_select(1, wc)), _f64(inp["b"][int(g)].index_select(0, wc))
        for j in range(k):
            rows = np.nonzero(idx[toks, j] == g)[0]
            z = x[rows] @ w_g + b_g
            ref[rows, j] = rw[rows, j, None] * reference.act_ref(z, "swiglu" if inp["gated"] else "relu")
    slots = torch.from_numpy((toks[:, None] * k + np.arange(k)[None, :]).reshape(-1))
    got = out.cpu()[slots][:, torch.from_numpy(cols)]
    return rel_error(got, ref.reshape(-1, cols.size))


register(TunableKernel(
    name="grouped_gemm", default=_gemm_default, space=_gemm_space, make_inputs=_gemm_inputs, run=_gemm_run,
    error=_gemm_error, tolerance=lambda dtype: tolerance(dtype),
    presets={"small": [{"T": 37, "k": 2, "G": 5, "D": 40, "N": 24, "gated": 0},
                       {"T": 20, "k": 1, "G": 3, "D": 24, "N": 20, "gated": 1}],
             "models": _model_shapes((64, 4096)),
             "full": _model_shapes((1, 16, 64, 256, 1024, 4096, 16384))},
))


def _fused_leaf_inputs(shape, dtype, device):
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    t, k, g, d, h, o, gated = (shape[key] for key in ("T", "k", "G", "D", "H", "N", "gated"))

    def r(*size, scale=1.0, dt=dtype):
        return (scale * torch.randn(*size, generator=gen, device=device)).to(dt)

    h1 = 2 * h if gated else h
    idx = _random_indices(t, k, g, gen, device)
    inp = {"x": r(t, d), "w1": r(g, d, h1, scale=d**-0.5), "b1": r(g, h1, scale=0.1), "w2": r(g, h, o, scale=h**-0.5),
           "b2": r(g, o, scale=0.1), "rw": torch.softmax(r(t, k, dt=torch.float32), 1), "idx": idx,
           "activation": "swiglu" if gated else "gelu"}
    inp["grouping"] = CountedGrouping(idx, g)
    return inp


def _fused_leaf_run(inp, cfg):
    return _leaf_mlp_fused(inp["grouping"], inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], inp["activation"],
                           inp["rw"].reshape(-1), config=cfg)


def _fused_leaf_error(inp, out) -> float:
    """Per-slot outputs of sampled tokens and columns against float64, and no NaN/inf anywhere."""
    if not torch.isfinite(out).all():
        return float("inf")
    k, o = inp["idx"].shape[1], out.shape[1]
    toks, cols = _sample(inp["x"].shape[0]), _sample(o)
    idx = inp["idx"].cpu().numpy()[toks]
    x, rw = _f64(inp["x"][torch.from_numpy(toks).to(inp["x"].device)]), _f64(inp["rw"])[toks]
    ref = np.zeros((toks.size, k, cols.size))
    for g in np.unique(idx):
        hidden = reference.act_ref(x @ _f64(inp["w1"][int(g)]) + _f64(inp["b1"][int(g)]), inp["activation"])
        y = hidden @ _f64(inp["w2"][int(g)])[:, cols] + _f64(inp["b2"][int(g)])[cols]
        for j in range(k):
            rows = np.nonzero(idx[:, j] == g)[0]
            ref[rows, j] = rw[rows, j, None] * y[rows]
    slots = torch.from_numpy((toks[:, None] * k + np.arange(k)[None, :]).reshape(-1))
    return rel_error(out.cpu()[slots][:, torch.from_numpy(cols)], ref.reshape(-1, cols.size))


def _fff_leaf_shapes(tokens, widths=(16, 64)) -> list[dict]:
    """FFF leaves of the speed targets: depth 8 (G = 256), D = O = 768, leaf width H."""
    return [{"T": t, "k": 1, "G": 256, "D": 768, "H": h, "N": 768, "gated": 0} for h in widths for t in tokens]


register(TunableKernel(
    name="leaf_mlp_fused", default=_fused_leaf_default, space=_fused_leaf_space, make_inputs=_fused_leaf_inputs,
    run=_fused_leaf_run, error=_fused_leaf_error, tolerance=lambda dtype: tolerance(dtype),
    smem_bytes=lambda shape, cfg, dtype: _fused_leaf_smem(shape, cfg, torch.empty((), dtype=dtype).element_size()),
    presets={"small": [{"T": 37, "k": 2, "G": 5, "D": 40, "H": 12, "N": 24, "gated": 0},
                       {"T": 29, "k": 1, "G": 3, "D": 24, "H": 20, "N": 18, "gated": 1}],
             "models": _fff_leaf_shapes((1024, 16384)),
             "full": _fff_leaf_shapes((128, 1024, 4096, 16384, 65536), (16, 32, 64, 128))
                     + [{"T": t, "k": 8, "G": 64, "D": 2048, "H": 32, "N": 2048, "gated": 1} for t in (1024, 4096)]},
))


def _wgrad_inputs(shape, dtype, device):
    inp = _gemm_inputs({**shape, "gated": 0}, dtype, device)
    gen = torch.Generator(device=torch.device(device)).manual_seed(1)
    inp["dz"] = torch.randn(shape["T"] * shape["k"], shape["N"], generator=gen, device=device).to(dtype)
    return inp


def _wgrad_run(inp, cfg):
    return _wgrad(inp["grouping"], inp["x"], inp["dz"], gather_a=True, gather_b=False, config=cfg)[0]


def _wgrad_error(inp, out) -> float:
    """Sampled rows and columns of dW for a few groups against float64, and no NaN/inf anywhere."""
    if not torch.isfinite(out).all():
        return float("inf")
    grouping = inp["grouping"]
    offsets = grouping.offsets64.cpu().numpy()
    tok = grouping.sorted_token.cpu().numpy()
    dsel, cols, groups = _sample(inp["x"].shape[1]), _sample(inp["dz"].shape[1]), _sample(grouping.num_groups, 4)
    x = _f64(inp["x"][:, torch.from_numpy(dsel).to(inp["x"].device)])
    dz = _f64(inp["dz"][:, torch.from_numpy(cols).to(inp["dz"].device)])
    ref = np.stack([x[tok[offsets[g]:offsets[g + 1]]].T @ dz[offsets[g]:offsets[g + 1]] for g in groups])
    got = out.cpu()[torch.from_numpy(groups)][:, torch.from_numpy(dsel)][:, :, torch.from_numpy(cols)]
    return rel_error(got, ref)


register(TunableKernel(
    name="grouped_wgrad", default=_wgrad_default, space=_wgrad_space, make_inputs=_wgrad_inputs, run=_wgrad_run,
    error=_wgrad_error, tolerance=lambda dtype: tolerance(dtype),
    presets={"small": [{"T": 37, "k": 2, "G": 5, "D": 40, "N": 24}],
             "models": [{key: s[key] for key in ("T", "k", "G", "D", "N")} for s in _model_shapes((64, 4096))],
             "full": [{key: s[key] for key in ("T", "k", "G", "D", "N")} for s in _model_shapes((64, 1024, 4096, 16384))]},
))


def _sum_inputs(shape, dtype, device):
    gen = torch.Generator(device=torch.device(device)).manual_seed(0)
    return {"buf": torch.randn(shape["T"] * shape["k"], shape["N"], generator=gen, device=device).to(dtype),
            "T": shape["T"], "k": shape["k"]}


def _sum_error(inp, out) -> float:
    return rel_error(out, _f64(inp["buf"]).reshape(inp["T"], inp["k"], -1).sum(1))


register(TunableKernel(
    name="grouped_slot_sum", default=_sum_default, space=_sum_space, make_inputs=_sum_inputs,
    run=lambda inp, cfg: _slot_sum(inp["buf"], inp["T"], inp["k"], inp["buf"].dtype, cfg),
    error=_sum_error, tolerance=lambda dtype: tolerance(dtype),
    presets={"small": [{"T": 37, "k": 3, "N": 40}],
             "models": [{"T": t, "k": k, "N": n} for t in (64, 4096) for k, n in ((2, 4096), (8, 2048))],
             "full": [{"T": t, "k": k, "N": n} for t in (64, 1024, 4096, 16384) for k in (2, 4, 8) for n in (768, 2048, 4096)]},
))
