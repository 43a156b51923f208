"""Torch fallbacks for FFT token mixing (torch.fft pipelines, vectorized over batch and channels),
and the parameter gradients (filter and kernel), which every backend computes here.

x is [B, S, D]; the math runs in float32 (complex64), or float64 for float64 inputs; outputs come
back in x's dtype. Real transforms (rfft/irfft) are used throughout: half the work of complex ones.
"""
from __future__ import annotations

from typing import Optional

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: a length the FFT libraries handle at full speed."""
    best = 1 << max(n - 1, 0).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best


def edge_mask(s: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[S//2 + 1, 1]: 0 at the bins irfft takes as real (DC, and Nyquist for even S), 1 elsewhere."""
    m = torch.ones(s // 2 + 1, 1, device=device, dtype=dtype)
    m[0] = 0
    if s % 2 == 0:
        m[-1] = 0
    return m


def hermitian_filter(filt: torch.Tensor, s: int, real: torch.dtype) -> torch.Tensor:
    """filt in complex(real) with the imaginary parts irfft ignores set to zero.

    numpy's irfft drops them; cuFFT's C2R assumes a Hermitian input and need not, so the fallback
    removes them explicitly to give numpy's result on every device.
    """
    f = filt.to(complex_dtype(real), copy=True)
    imag = f.imag  # a view: zeroing it edits f
    imag[..., 0, :] = 0
    if s % 2 == 0:
        imag[..., -1, :] = 0
    return f


#: CPU cache blocking. Past a few tens of MB, one more pass over a spectrum that has left the caches
#: costs more than the FFT itself, so the pipelines run block by block over channels (spectral
#: filter, convolution) or batch rows (fnet), each block's spectrum about BLOCK_BYTES, when the
#: whole spectrum would exceed the op's threshold below. Measured on the 2-core CI machine (B=8,
#: D=768, float32, whole tensor -> blocks): fft_conv S=1024 155 -> 65 ms, S=4096 610 -> 318 ms;
#: spectral_filter S=4096 326 -> 240 ms (S=1024 got slower in blocks: 28 -> 45 ms, hence its
#: threshold); fnet_mix S=4096 306 -> 157 ms (batch rows of 32 MB).
BLOCK_BYTES = 8 * 2**20
CONV_BLOCKS_ABOVE = 16 * 2**20  # S=256 (12.6 MB of spectrum) measured 0.89x torch.fft in two blocks
SPECTRAL_BLOCKS_ABOVE = 64 * 2**20
FNET_BLOCKS_ABOVE, FNET_BLOCK_BYTES = 64 * 2**20, 32 * 2**20


def cpu_blocks(x: torch.Tensor, dim: int, bytes_per_index: int, above: int,
               block_bytes: Optional[int] = None) -> list[slice]:
    """Slices of x's dim `dim` for cache blocking on a CPU: one slice (all) on other devices or when
    the whole spectrum (bytes_per_index * size) is at most `above`; else blocks of about
    block_bytes (multiples of 16 along channels)."""
    size = x.shape[dim]
    if x.device.type != "cpu" or bytes_per_index * size <= above:
        return [slice(0, size)]
    step = max(1, (block_bytes or BLOCK_BYTES) // bytes_per_index)
    if dim == x.dim() - 1 and step >= 16:
        step -= step % 16
    return [slice(i, min(size, i + step)) for i in range(0, size, step)]


def _complex_bytes(x: torch.Tensor) -> int:
    return 16 if compute_dtype(x) == torch.float64 else 8


def _blockwise(fn, x: torch.Tensor, blocks: list[slice], dim: int, *others) -> torch.Tensor:
    """fn(x block, other blocks...) for each block along `dim`, written into one output like x."""
    if len(blocks) == 1:
        return fn(x, *(o(blocks[0]) for o in others))
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    index = [slice(None)] * x.dim()
    for blk in blocks:
        index[dim] = blk
        y[tuple(index)] = fn(x[tuple(index)], *(o(blk) for o in others))
    return y


#: element counts [lo, hi) where fnet_mix_torch takes the half-spectrum route; outside it the plain
#: full fft2. The half spectrum saves half the FFT work, but its symmetric fill makes extra passes
#: over memory: below lo the FFT work is too small to pay for them, above hi (far beyond the caches)
#: the passes cost more than they save. Measured on the CPU machine, 2 threads, B=8, D=768 (half
#: spectrum vs fft2): S=256 6.0 vs 4.9 ms, S=1024 31 vs 70 ms, S=4096 443 vs 327 ms.
FNET_HALF_SPECTRUM_NUMEL = (4 * 2**20, 12 * 2**20)


def fnet_mix_torch(x: torch.Tensor) -> torch.Tensor:
    """Re(FFT_S(FFT_D(x))), in blocks of batch rows on a CPU (cpu_blocks)."""
    b, s, d = x.shape
    blocks = cpu_blocks(x, 0, s * d * _complex_bytes(x), FNET_BLOCKS_ABOVE, FNET_BLOCK_BYTES)
    return _blockwise(_fnet_mix_block, x, blocks, 0)


def _fnet_mix_block(x: torch.Tensor) -> torch.Tensor:
    """Re(FFT_S(FFT_D(x))): rfft along D, complex FFT along S on the half spectrum, then the other
    half of the real part by symmetry: Re Z[s, D - d] = Re Z[-s mod S, d] for real x (two flips
    instead of gathers: the cheapest on CPU)."""
    b, s, d = x.shape
    lo, hi = FNET_HALF_SPECTRUM_NUMEL
    if not lo <= x.numel() < hi:
        return torch.fft.fft2(x.to(compute_dtype(x)), dim=(-2, -1)).real.to(x.dtype)
    z = torch.fft.fft(torch.fft.rfft(x.to(compute_dtype(x)), dim=-1), dim=-2).real
    h = d // 2 + 1
    if h == d:
        return z.to(x.dtype)
    y = torch.empty(b, s, d, device=x.device, dtype=z.dtype)
    y[..., :h] = z
    tail = z[..., 1: d - h + 1].flip(-1)  # column D - d' for d' = h..D-1
    y[:, :1, h:] = tail[:, :1]
    y[:, 1:, h:] = tail[:, 1:].flip(1)  # row -s mod S
    return y.to(x.dtype)


def spectral_filter_torch(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """irfft(rfft(x, dim=S) * filt, n=S); filt [S//2+1, D] or [B or 1, S//2+1, D] complex. In blocks
    of channels on a CPU (cpu_blocks)."""
    b, s, _ = x.shape
    blocks = cpu_blocks(x, 2, b * (s // 2 + 1) * _complex_bytes(x), SPECTRAL_BLOCKS_ABOVE)
    return _blockwise(_spectral_filter_block, x, blocks, 2, lambda blk: filt[..., blk])


def _spectral_filter_block(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    s = x.shape[1]
    real = compute_dtype(x)
    spec = torch.fft.rfft(x.to(real), dim=1)
    # irfft takes DC (and Nyquist) as real: numpy drops the product's imaginary parts there, and so
    # does torch's CPU irfft, but cuFFT's C2R need not. The rfft of real x is real at those bins, so
    # elsewhere dropping the filter's imaginary parts there (a filter-sized copy) gives numpy's result.
    spec *= filt.to(complex_dtype(real)) if x.device.type == "cpu" else hermitian_filter(filt, s, real)
    return torch.fft.irfft(spec, n=s, dim=1).to(x.dtype)


def fft_conv_torch(x: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """Long convolution along S with k [L, D], L <= S: causal (linear, truncated) or circular. In
    blocks of channels on a CPU (cpu_blocks)."""
    b, s, _ = x.shape
    n = fast_len(2 * s - 1) if causal else s
    blocks = cpu_blocks(x, 2, b * (n // 2 + 1) * _complex_bytes(x), CONV_BLOCKS_ABOVE)
    return _blockwise(lambda xb, kb: _fft_conv_block(xb, kb, n), x, blocks, 2, lambda blk: k[:, blk])


def _fft_conv_block(x: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    s = x.shape[1]
    real = compute_dtype(x)
    spec = torch.fft.rfft(x.to(real), n=n, dim=1)
    spec *= torch.fft.rfft(k.to(real), n=n, dim=0)
    y = torch.fft.irfft(spec, n=n, dim=1)
    return (y[:, :s] if n != s else y).to(x.dtype)


# ----------------------------------------------------------------------------- parameter gradients

def spectral_filter_grad_filt(x: torch.Tensor, g: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """dL/dfilt (torch's convention: dL/dRe + i dL/dIm) of y = irfft(rfft(x) * filt, n=S).

    With c = irfft(filt) the op is a circular convolution y = c * x, so dL/dc is the circular
    cross-correlation of g with x, whose spectrum is G conj(X). Then c = irfft(filt) gives
    dL/dfilt[k] = w_k / S * G[k] conj(X[k]), w_k = 2 except 1 at DC and Nyquist (the bins counted
    once), with a zero imaginary part at those bins (irfft ignores it). Summed over the batch when
    the filter is shared. Returned in filt's dtype and shape.
    """
    s = x.shape[1]
    real = compute_dtype(x)
    prod = torch.fft.rfft(g.to(real), dim=1) * torch.fft.rfft(x.to(real), dim=1).conj()
    if filt.dim() == 2:
        prod = prod.sum(0)
    elif filt.shape[0] == 1 and x.shape[0] != 1:
        prod = prod.sum(0, keepdim=True)
    mask = edge_mask(s, x.device, real)
    weight = (1.0 + mask) / s  # 2/S inside, 1/S at DC and Nyquist
    return torch.complex(prod.real * weight, prod.imag * weight * mask).to(filt.dtype)


def fft_conv_grad_k(x: torch.Tensor, g: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """dL/dk [L, D]: the cross-correlation of g with x at lags 0..L-1 (linear when causal, circular
    otherwise), summed over the batch in the frequency domain (one inverse transform)."""
    s, length = x.shape[1], k.shape[0]
    real = compute_dtype(x)
    n = fast_len(2 * s - 1) if causal else s
    prod = (torch.fft.rfft(g.to(real), n=n, dim=1) * torch.fft.rfft(x.to(real), n=n, dim=1).conj()).sum(0)
    return torch.fft.irfft(prod, n=n, dim=0)[:length].to(k.dtype)
