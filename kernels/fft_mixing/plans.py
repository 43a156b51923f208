"""Host side of the spectral kernels: which transform each length takes, and the DFT tables.

A transform of length M = N1 * N2 runs as the four-step (Monarch) factorization: view the sequence
as a matrix x[n1, n2] (n = n1 * N2 + n2), take N1-point DFTs down the columns (one [N1, N1] DFT
matrix times the tile), multiply by the twiddles W_M^(n2 k1), take N2-point DFTs along the rows;
X[k1 + N1 * k2] is then element [k1, k2]. Each factor's tile is padded to a power of two P >= 16 (a
tl.dot needs every dim >= 16) with zero rows/columns in the DFT matrices, so a factor need not be a
power of two and the padding never changes the result. N2 = 1 is the dense DFT (one matrix).

Convolutions (spectral_filter, fft_conv) pick one of three modes:
- CIRC: M = S exactly, circular, for S = N1 * N2 with both padded factors small enough;
- PERIODIC: circular convolution of any S (primes too) through a transform of M >= 2S: the kernel
  reads x periodically extended to 2S, and outputs S..2S-1 of the linear convolution of that with
  the circular kernel are exactly the circular result (no wrap-around can reach them);
- CAUSAL: linear convolution (zero history) through M >= 2S - 1, outputs 0..S-1.
The cheapest plan by a FLOP model wins (see `conv_plan`). A plan is either fused (the whole
transform-multiply-inverse in registers, padded factors <= MAX_FACTOR) or, for longer transforms,
split: column DFTs as a GEMM with the twiddles in its epilogue, a row pass (row DFT, multiply,
inverse row DFT, conjugate twiddles), inverse column DFTs, through an fp32 complex scratch that
holds the column spectrum's rows k1 <= N1 / 2 only (the others are their conjugates).
Every table is exact to float32: angles come from the integer phase (k * n) mod N in float64.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

CIRC, CAUSAL, PERIODIC = 0, 1, 2
MODE_NAMES = {CIRC: "circular", CAUSAL: "causal", PERIODIC: "periodic-extension"}

#: largest padded factor P1, P2 held in registers (the [P, P] DFT matrices are tl.dot operands)
MAX_FACTOR = 64
#: largest register tile P1 * P2 * BLOCK_D (elements of one real tile) of the fused kernels; at 4096
#: (S = 4096, 64 x 64, one channel) the sm_90 build already uses 255 registers and spills a little
MAX_TILE = 4096
#: largest padded factor of the split (out-of-register) path's row pass; its column passes loop over n1
MAX_SPLIT_FACTOR = 128
#: largest transform of the split path; beyond, the Triton backend is not offered (torch serves)
MAX_SPLIT_M = 1 << 18
#: longest DFT whose whole [L, L] matrix the DFT GEMM reads as a table (8 MB of float32 pairs at
#: 1024; longer ones gather from the unit circle, see triton_kernels.dft_gemm_kernel)
DENSE_TABLE_MAX = 1024
#: largest column factor N1 of the split path: the row pass launches one program per k1 on grid dim 1
#: (CUDA: at most 65535)
MAX_SPLIT_N1 = 65535


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def pad16(n: int) -> int:
    """Padded tile size of a factor: a power of two, at least 16."""
    return max(16, next_pow2(n))


@dataclass(frozen=True)
class Plan:
    """How one transform length runs. `split`: the out-of-register three-pass path."""

    M: int
    N1: int
    N2: int
    P1: int
    P2: int
    mode: int = CIRC
    split: bool = False

    @property
    def dense(self) -> bool:
        return self.P2 == 1

    @property
    def min_block(self) -> int:
        """Smallest channel block: the dense path's tl.dot has the channels as its N dim."""
        return 16 if self.dense else 1

    @property
    def max_block(self) -> int:
        return max(self.min_block, MAX_TILE // (self.P1 * self.P2))

    @property
    def split_rows(self) -> int:
        """Rows k1 of the column spectrum a convolution's split path keeps: those up to N1 / 2 (the
        others are their conjugates; ops._launch_split_conv)."""
        return self.N1 // 2 + 1

    @property
    def half_io(self) -> bool:
        """A causal transform whose first factor fills its tile (N1 = P1, at least 32 so that half a
        tile is still a dot operand): its S <= M / 2 positions lie in the first P1 / 2 rows, so the
        fused kernel loads x and computes y for those rows only (fused_conv_kernel's HALF_IO)."""
        return self.mode == CAUSAL and self.N1 == self.P1 >= 32

    def flops(self) -> float:
        """Real multiply-adds per channel of a forward + inverse (the cost model that picks plans)."""
        first = (2.0 if self.half_io else 4.0) * self.P1 * self.P1  # first and last stage, x P2
        if self.dense:
            return first
        return first * self.P2 + 8.0 * self.P1 * self.P2 * self.P2

    def describe(self) -> str:
        if self.split:
            return (f"split 3-pass M={self.M}={self.N1}x{self.N2} ({self.N1}-point column DFTs as GEMMs, "
                    f"rows in {self.P2}-tiles) ({MODE_NAMES[self.mode]})")
        kind = "dense DFT" if self.dense else "fused four-step"
        return f"{kind} M={self.M}={self.N1}x{self.N2} tiles {self.P1}x{self.P2} ({MODE_NAMES[self.mode]})"


def _factor_pairs(m: int):
    """(N1, N2) with N1 * N2 = m (N2 = 1 included)."""
    out = []
    for a in range(1, int(math.isqrt(m)) + 1):
        if m % a == 0:
            out.append((m // a, a))
            if a != m // a:
                out.append((a, m // a))
    return out


def _fused_candidates(m: int, mode: int):
    for n1, n2 in _factor_pairs(m):
        p1 = pad16(n1)
        p2 = 1 if n2 == 1 else pad16(n2)
        if p1 > MAX_FACTOR or p2 > MAX_FACTOR:
            continue
        plan = Plan(m, n1, n2, p1, p2, mode)
        if p1 * p2 * plan.min_block > MAX_TILE:
            continue
        yield plan


def _pick(cands) -> Optional[Plan]:
    # cheapest; ties: exact circular first (no extension), then the larger first factor (its DFT
    # is the real-input/real-output one, 2 dots instead of 4)
    cands = list(cands)
    if not cands:
        return None
    return min(cands, key=lambda p: (p.flops(), p.mode != CIRC, -p.P1))


def _split_candidates(m: int, mode: int):
    """Three-pass plans: row factor N2 with a padded tile <= MAX_SPLIT_FACTOR, any column factor N1
    (the column passes are dense DFT GEMMs looping over n1, so N1 needs no padding)."""
    if m > MAX_SPLIT_M:
        return
    for n1, n2 in _factor_pairs(m):
        if 2 <= n1 <= MAX_SPLIT_N1 and n2 >= 2 and pad16(n2) <= MAX_SPLIT_FACTOR:
            yield Plan(m, n1, n2, pad16(n1), pad16(n2), mode, split=True)


def _split_cost(p: Plan) -> float:
    # elements N1 * P2; per element ~N1 (two dense column DFTs) + ~2 P2 (row DFT and its inverse)
    return float(p.N1 * p.P2 * (p.N1 + 2 * p.P2))


def _pick_split(cands) -> Optional[Plan]:
    cands = list(cands)
    return min(cands, key=lambda p: (_split_cost(p), p.mode != CIRC)) if cands else None


@functools.lru_cache(maxsize=512)
def conv_plan(s: int, causal: bool, allow_fused: bool = True) -> Optional[Plan]:
    """The plan of a length-S convolution (spectral_filter, fft_conv), or None (no Triton plan:
    exactly when not has_conv_plan(s, causal))."""
    if not has_conv_plan(s, causal):
        return None
    if causal:
        m = next_pow2(2 * s - 1)
        fused = _pick(_fused_candidates(m, CAUSAL)) if allow_fused else None
        return fused or _pick_split(_split_candidates(m, CAUSAL))
    m2 = next_pow2(2 * s)
    if allow_fused:
        fused = _pick(list(_fused_candidates(s, CIRC)) + list(_fused_candidates(m2, PERIODIC)))
        if fused is not None:
            return fused
    return _pick_split(list(_split_candidates(s, CIRC)) + list(_split_candidates(m2, PERIODIC)))


def has_conv_plan(s: int, causal: bool) -> bool:
    """conv_plan(s, causal) is not None, by arithmetic only (cheap, and traceable by torch.compile):
    the periodic extension / causal transform of a power of two >= 2S always has a split plan."""
    return next_pow2(2 * s - 1 if causal else 2 * s) <= MAX_SPLIT_M


@functools.lru_cache(maxsize=512)
def dft_plan(length: int, allow_fused: bool = True) -> Optional[Plan]:
    """Plan of an exact DFT of `length` (fnet_mix): in-register, else three-pass (cheaper than a
    dense DFT), else None (the dense DFT GEMM, O(length^2), e.g. for a large prime)."""
    fused = _pick(_fused_candidates(length, CIRC)) if allow_fused else None
    if fused is not None:
        return fused
    split = _pick_split(_split_candidates(length, CIRC))
    if split is not None and _split_cost(split) < float(length) * length:
        return split
    return None


# ----------------------------------------------------------------------------- tables

def _dft_np(n: int, p: int, sign: float = -1.0) -> np.ndarray:
    """[2, p, p] float64: exp(sign 2 pi i k j / n) for k, j < n, zero padded to p."""
    out = np.zeros((2, p, p))
    k = np.arange(n)
    ang = 2.0 * np.pi * (np.outer(k, k) % n) / n
    out[0, :n, :n] = np.cos(ang)
    out[1, :n, :n] = sign * np.sin(ang)
    return out


def _table(values: np.ndarray, device: str) -> torch.Tensor:
    """A float64 NumPy table as a contiguous float32 tensor on `device`."""
    return torch.from_numpy(values).to(device=device, dtype=torch.float32).contiguous()


@functools.lru_cache(maxsize=256)
def dft_matrix(n: int, p: int, device: str) -> torch.Tensor:
    """[2, p, p] float32 (real, imaginary) of the n-point forward DFT matrix, zero padded to p."""
    return _table(_dft_np(n, p), device)


@functools.lru_cache(maxsize=256)
def twiddles(n1: int, n2: int, p1: int, p2: int, device: str) -> torch.Tensor:
    """[2, p1, p2] float32: W_M^(k1 n2) = exp(-2 pi i k1 n2 / M), M = n1 n2, zero padded."""
    m = n1 * n2
    out = np.zeros((2, p1, p2))
    ang = 2.0 * np.pi * (np.outer(np.arange(n1), np.arange(n2)) % m) / m
    out[0, :n1, :n2] = np.cos(ang)
    out[1, :n1, :n2] = -np.sin(ang)
    return _table(out, device)


@functools.lru_cache(maxsize=64)
def unit_circle(n: int, device: str) -> torch.Tensor:
    """[2, n] float32: cos and sin of 2 pi j / n (the dense-GEMM path gathers at (k n) mod n)."""
    ang = 2.0 * np.pi * np.arange(n) / n
    return _table(np.stack([np.cos(ang), np.sin(ang)]), device)


@functools.lru_cache(maxsize=16)  # up to 8 MB each: a few lengths, not dft_matrix's 256
def _dense_table(n: int, device: str) -> torch.Tensor:
    return _table(_dft_np(n, n), device)


def gemm_table(n: int, device: str) -> tuple[torch.Tensor, bool]:
    """The DFT matrix of length n for dft_gemm_kernel and whether it is the dense [2, n, n] forward
    matrix (n <= DENSE_TABLE_MAX; dft_matrix's values) rather than the unit circle [2, n] (the
    kernel's DENSE_TABLE argument)."""
    if n <= DENSE_TABLE_MAX:
        return _dense_table(n, device), True
    return unit_circle(n, device), False


def device_key(device: torch.device) -> str:
    return str(torch.device(device))
