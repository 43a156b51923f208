"""float64 NumPy references for FFT token mixing, written from the math of DESIGN.md (no torch).

Inputs are `x [..., S, D]` (mixing along S). Arguments may be NumPy arrays or anything with a
`.numpy()` path (torch tensors of any device and dtype are converted by duck typing, without
importing torch), since the benchmark harness hands its inputs over as they are.
"""
from __future__ import annotations

import numpy as np


def _np(a, complex_: bool = False) -> np.ndarray:
    """float64 (or complex128) NumPy copy of an array or a tensor-like (duck-typed .detach().cpu())."""
    if not isinstance(a, np.ndarray) and hasattr(a, "detach"):
        t = a.detach().cpu()
        a = (t.resolve_conj().cdouble() if t.is_complex() else t.double()).numpy()
    a = np.asarray(a)
    if complex_ or np.iscomplexobj(a):
        return a.astype(np.complex128)
    return a.astype(np.float64)


def fnet_mix_ref(x) -> np.ndarray:
    """FNet mixing: Re(FFT_S(FFT_D(x))) over the last two dims, float64 [..., S, D]."""
    return np.fft.fft2(_np(x), axes=(-2, -1)).real


def spectral_filter_ref(x, filt) -> np.ndarray:
    """irfft(rfft(x, axis=S) * filt, n=S, axis=S); filt complex [S//2+1, D] or [..., S//2+1, D].

    numpy's irfft ignores the imaginary part of the DC bin (and of the Nyquist bin for even S):
    the result is the real signal whose half spectrum is the product with those parts dropped.
    """
    x = _np(x)
    s = x.shape[-2]
    return np.fft.irfft(np.fft.rfft(x, axis=-2) * _np(filt, complex_=True), n=s, axis=-2)


def fft_conv_ref(x, k, causal: bool = True) -> np.ndarray:
    """Long convolution along S with a kernel k [L, D] (L <= S), float64 [..., S, D].

    causal: y[s] = sum_{j <= s} k[j] x[s - j] (linear convolution truncated to S, zero history);
    circular: y[s] = sum_j k[j] x[(s - j) mod S] (k zero-padded to S).
    Computed with numpy.fft on a length that makes the circular product exact.
    """
    x, k = _np(x), _np(k)
    s, length = x.shape[-2], k.shape[-2]
    n = 2 * s if causal else s
    kp = np.zeros(k.shape[:-2] + (n, k.shape[-1]))
    kp[..., :length, :] = k
    y = np.fft.irfft(np.fft.rfft(x, n=n, axis=-2) * np.fft.rfft(kp, axis=-2), n=n, axis=-2)
    return y[..., :s, :]


def fft_conv_direct_ref(x, k, causal: bool = True) -> np.ndarray:
    """fft_conv_ref by the direct sum over kernel taps (no FFT): an independent check of the FFT math."""
    x, k = _np(x), _np(k)
    s, length = x.shape[-2], k.shape[-2]
    y = np.zeros_like(x)
    for j in range(length):
        if causal:
            y[..., j:, :] += k[j] * x[..., : s - j, :]
        else:
            y += k[j] * np.roll(x, j, axis=-2)
    return y


def spectral_filter_direct_ref(x, filt) -> np.ndarray:
    """spectral_filter_ref as an explicit circulant per channel (O(S^2) DFT sums, no numpy.fft).

    The filter acts as a circular convolution with c = irfft(filt): c[j] = (1/S) sum over the full
    Hermitian spectrum, with the imaginary parts of DC and Nyquist dropped as irfft does.
    """
    x, f = _np(x), _np(filt, complex_=True)
    s = x.shape[-2]
    half = s // 2 + 1
    full = np.zeros(f.shape[:-2] + (s, f.shape[-1]), dtype=np.complex128)
    full[..., :half, :] = f
    full[..., 0, :] = f[..., 0, :].real
    if s % 2 == 0:
        full[..., s // 2, :] = f[..., s // 2, :].real
    kk = np.arange(s)
    if s > 2:
        mirror = kk[half:]
        full[..., mirror, :] = np.conj(f[..., s - mirror, :])
    phase = np.exp(2j * np.pi * np.outer(kk, kk) / s)  # [j, k]
    c = (np.einsum("jk,...kd->...jd", phase, full) / s).real  # the circular kernel
    y = np.zeros(np.broadcast_shapes(x.shape, c.shape))
    for j in range(s):
        y = y + c[..., j : j + 1, :] * np.roll(x, j, axis=-2)
    return y
