"""What a user would run instead of a tritonlab op: the baselines of the benchmark harness.

Every function here is plain torch (cuBLAS / cuFFT on a GPU, the CPU kernels of torch elsewhere).
They are the comparison points of `tritonlab report`, so each is the ordinary, reasonable way to
get the same (or, for the dense FFN, the equivalent-width) result without tritonlab, not a straw man:

- tree routing: a dense FFN of the same total width (the layer FFF replaces), routing through one
  dense matmul of all node logits, and the "reference formula" (gather each token's node rows and
  leaf weights), eagerly or under torch.compile;
- grouped GEMM: torch._grouped_mm over tokens sorted by group, or the loop over experts with
  index_select / index_add_ (Hugging Face's Mixtral layer);
- quantized: torch._scaled_mm (fp8, row-wise scales), torch._int_mm (int8), the bf16/fp32 matmul and
  FFN a user would keep without quantization, and the quantization formula in torch;
- FFT mixing: the torch.fft pipeline (rfft, multiply, irfft) in float32.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .kernels._backend import torch_activation

# ----------------------------------------------------------------------------- dense layers


def dense_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], activation: Optional[str]) -> torch.Tensor:
    """act(x @ w1 + b1) @ w2 + b2 with w1 [D, W], w2 [W, O] (addmm: one cuBLAS GEMM + fused bias each)."""
    h = torch.addmm(b1, x, w1) if b1 is not None else x @ w1
    h = torch_activation(h, activation)
    return torch.addmm(b2, h, w2) if b2 is not None else h @ w2


def linear_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], activation: Optional[str]) -> torch.Tensor:
    """The nn.Linear form: act(x @ w1.T + b1) @ w2.T + b2 with w1 [H, D], w2 [O, H]."""
    return F.linear(torch_activation(F.linear(x, w1, b1), activation), w2, b2)


# ----------------------------------------------------------------------------- tree routing


def tree_route_dense_logits(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """All node logits in one matmul ([T, 2**depth - 1], float32), then the walk as `depth` gathers."""
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    xf, wf = x.float(), node_weight.float()
    logits = torch.addmm(node_bias.float(), xf, wf.T) if node_bias is not None else xf @ wf.T
    node = torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device)
    for _ in range(depth):
        node = 2 * node + 1 + (logits.gather(1, node) >= 0)
    return (node.squeeze(1) - (2**depth - 1)).to(torch.int32)


def tree_walk_naive(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor], levels: int):
    """The reference formula in torch: per level, gather each token's node row and take the dot.

    Returns (final heap node [T] int64, path nodes [T, levels], path logits [T, levels] float32).
    """
    xf = x.float()
    node = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    nodes, logits = [], []
    for _ in range(levels):
        logit = (xf * node_weight[node].float()).sum(-1)
        if node_bias is not None:
            logit = logit + node_bias[node].float()
        nodes.append(node)
        logits.append(logit)
        node = 2 * node + 1 + (logit >= 0).long()
    return node, torch.stack(nodes, 1), torch.stack(logits, 1)


def tree_route_naive(x: torch.Tensor, node_weight: torch.Tensor, node_bias: Optional[torch.Tensor]) -> torch.Tensor:
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    node, _, _ = tree_walk_naive(x, node_weight, node_bias, depth)
    return (node - (2**depth - 1)).to(torch.int32)


def fff_forward_naive(x, node_weight, node_bias, w1, b1, w2, b2, activation) -> torch.Tensor:
    """Route naively, then gather each token's leaf weights ([T, D, H] and [T, H, O]) and bmm."""
    depth = (node_weight.shape[0] + 1).bit_length() - 1
    node, _, _ = tree_walk_naive(x, node_weight, node_bias, depth)
    leaf = node - (2**depth - 1)
    h = torch.bmm(x[:, None, :], w1[leaf]).squeeze(1)
    if b1 is not None:
        h = h + b1[leaf]
    y = torch.bmm(torch_activation(h, activation)[:, None, :], w2[leaf]).squeeze(1)
    return y + b2[leaf] if b2 is not None else y


def fff_path_forward_naive(x, w_in, w_out, b_in, activation) -> torch.Tensor:
    """UltraFastBERT's formula: walk the path, sum act(logit_n) * w_out[n] over its nodes."""
    levels = (w_in.shape[0] + 1).bit_length() - 1
    _, nodes, logits = tree_walk_naive(x, w_in, b_in, levels)
    coeff = torch_activation(logits, activation)
    return torch.einsum("tl,tlo->to", coeff, w_out[nodes].float()).to(x.dtype)


# ----------------------------------------------------------------------------- grouped GEMM


def _slots(indices: torch.Tensor, route_weights: Optional[torch.Tensor]):
    """Flatten [T, k] (or [T]) routing to per-slot (group, token, weight or None)."""
    idx = indices.reshape(indices.shape[0], -1)
    t, k = idx.shape
    token = torch.arange(t, device=idx.device).repeat_interleave(k)
    rw = None if route_weights is None else route_weights.reshape(-1)
    return idx.reshape(-1).long(), token, rw


def expert_loop(x: torch.Tensor, indices: torch.Tensor, mlp: Callable[[int, torch.Tensor], torch.Tensor],
                out_width: int, route_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The loop over experts (as in Hugging Face's Mixtral): for each group that has slots (found
    once), select its slots, run its MLP on the gathered rows, scale by the route weight, index_add_
    into the output (float32 accumulator). Empty groups cost nothing, as in that loop: at G = 256 and
    T = 64 most groups are empty, and a host sync for each would inflate the baseline."""
    group, token, rw = _slots(indices, route_weights)
    y = torch.zeros(x.shape[0], out_width, dtype=torch.float32, device=x.device)
    for g in torch.unique(group).tolist():
        sel = (group == g).nonzero().squeeze(1)
        tok = token.index_select(0, sel)
        out = mlp(g, x.index_select(0, tok)).float()
        if rw is not None:
            out = out * rw.index_select(0, sel).float()[:, None]
        y.index_add_(0, tok, out)
    return y.to(x.dtype)


def gms_expert_loop(x, weight, indices, bias=None, route_weights=None, activation=None) -> torch.Tensor:
    def mlp(g, rows):
        h = rows @ weight[g]
        return torch_activation(h + bias[g] if bias is not None else h, activation)

    return expert_loop(x, indices, mlp, weight.shape[2], route_weights)


def leaf_mlp_expert_loop(x, indices, w1, b1, w2, b2, activation="relu", route_weights=None) -> torch.Tensor:
    def mlp(g, rows):
        h = rows @ w1[g]
        h = torch_activation(h + b1[g] if b1 is not None else h, activation)
        y = h @ w2[g]
        return y + b2[g] if b2 is not None else y

    return expert_loop(x, indices, mlp, w2.shape[2], route_weights)


def _grouped_layout(indices: torch.Tensor, num_groups: int):
    group, token, _ = _slots(indices, None)
    order = torch.argsort(group, stable=True)
    offs = torch.cumsum(torch.bincount(group, minlength=num_groups), 0).to(torch.int32)
    return order, group.index_select(0, order), token.index_select(0, order), offs


def gms_grouped_mm(x, weight, indices, bias=None, route_weights=None, activation=None) -> torch.Tensor:
    """torch._grouped_mm over the slots sorted by group (sort, gather, one grouped GEMM, scatter-add)."""
    order, group, token, offs = _grouped_layout(indices, weight.shape[0])
    h = torch._grouped_mm(x.index_select(0, token), weight, offs=offs)
    if bias is not None:
        h = h + bias.index_select(0, group)
    h = torch_activation(h, activation).float()
    if route_weights is not None:
        h = h * route_weights.reshape(-1).index_select(0, order).float()[:, None]
    y = torch.zeros(x.shape[0], weight.shape[2], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token, h).to(x.dtype)


def leaf_mlp_grouped_mm(x, indices, w1, b1, w2, b2, activation="relu", route_weights=None) -> torch.Tensor:
    """Two torch._grouped_mm calls with the hidden layer kept in grouped order between them."""
    order, group, token, offs = _grouped_layout(indices, w1.shape[0])
    h = torch._grouped_mm(x.index_select(0, token), w1, offs=offs)
    if b1 is not None:
        h = h + b1.index_select(0, group)
    h = torch_activation(h, activation)
    y = torch._grouped_mm(h, w2, offs=offs)
    if b2 is not None:
        y = y + b2.index_select(0, group)
    y = y.float()
    if route_weights is not None:
        y = y * route_weights.reshape(-1).index_select(0, order).float()[:, None]
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y).to(x.dtype)


# ----------------------------------------------------------------------------- quantized

QMAX = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
QDTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def quantize_rows(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization written in torch (DESIGN.md rules: scale = amax / qmax, 1 for all-zero rows)."""
    qmax = QMAX[dtype]
    # amax / qmax rounded once, as the definition: CUDA torch divides by a Python float as a multiply
    # by its reciprocal (one ulp off for some rows); then x times the reciprocal of the scale, not
    # x / scale. Either difference moves values across fp8 rounding ties: the H100 report had this
    # baseline 1.4e-3 from the reference at 8192^2 fp8, over the 1e-3 tolerance.
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax / torch.full((), qmax, device=amax.device)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = x.float() * (1.0 / scale)
    if dtype == "int8":
        return torch.round(y).clamp_(-127, 127).to(torch.int8), scale
    return y.clamp_(-qmax, qmax).to(QDTYPES[dtype]), scale


def int_mm_scaled(a_q: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """torch._int_mm (int32 accumulation) then the row/column scales: b_t is b_q.T ([K, N])."""
    acc = torch._int_mm(a_q, b_t)
    return (acc.float() * a_scale.reshape(-1, 1) * b_scale.reshape(1, -1)).to(out_dtype)


def scaled_mm_rowwise(a_q: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
                      out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales ([M, 1] and [1, N]) and the bias in its epilogue; b_t is
    b_q.T (column-major [K, N]). Fast accumulation, as our kernel's fp8 dots get on sm_90 (Triton's
    max_num_imprecise_acc default there), so that both sides do the same work."""
    return torch._scaled_mm(a_q, b_t, scale_a=a_scale, scale_b=b_scale, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=True)


# ----------------------------------------------------------------------------- FFT mixing


def fnet_fft(x: torch.Tensor) -> torch.Tensor:
    """Re(FFT_S(FFT_D(x))) through torch.fft in float32."""
    return torch.fft.fft2(x.float(), dim=(1, 2)).real.to(x.dtype)


def spectral_filter_fft(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """irfft(rfft(x, dim=S) * filt, n=S) in float32."""
    s = x.shape[1]
    return torch.fft.irfft(torch.fft.rfft(x.float(), dim=1) * filt, n=s, dim=1).to(x.dtype)


def fft_conv_fft(x: torch.Tensor, k: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Long convolution along S: zero-padded to 2S (linear, truncated to S) when causal, else circular."""
    s = x.shape[1]
    n = 2 * s if causal else s
    xf = torch.fft.rfft(x.float(), n=n, dim=1)
    kf = torch.fft.rfft(k.float(), n=n, dim=0)
    return torch.fft.irfft(xf * kf, n=n, dim=1)[:, :s].to(x.dtype)
