"""FFTTokenMixer: FFT-based token mixing layers (FNet, GFNet, adaptive filters, Hyena-style long
convolutions) on the fused spectral kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .._backend import FLOAT_DTYPES, RecordedSettings, check_backend, check_tensor, is_int
from .ops import fft_conv, fnet_mix, spectral_filter

MODES = ("fnet", "filter", "adaptive", "conv")


class _Sin(nn.Module):
    """sin(w * x) with a learnable frequency per feature (Hyena's implicit-filter activation)."""

    def __init__(self, width: int, w: float = 1.0):
        super().__init__()
        self.freq = nn.Parameter(torch.full((width,), float(w)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class FFTTokenMixer(RecordedSettings, nn.Module):
    """Token mixing along the sequence of x [..., S, D] by FFTs, in one of four modes:

    - "fnet" (Lee-Thorp et al., FNet): y = Re(FFT_S(FFT_D(x))); no parameters, any S.
    - "filter" (Rao et al., GFNet global filter): y = irfft(rfft(x) * W, n=S) with a learnable complex
      filter W [S//2 + 1, D], initialised as GFNet does (normal, std 0.02, real and imaginary parts).
      Needs S == seq_len.
    - "adaptive" (Adaptive Frequency Filters, Huang et al.; FFTNet's adaptive spectral filter): the
      base filter W modulated per input by a small MLP of the global context c = mean over S of x:
      W_b = W * (1 + m_b), m_b = MLP(c_b) a complex gain per channel (the MLP's last layer starts at
      zero, so the layer starts as "filter"). Needs S == seq_len.
    - "conv" (Hyena, Poli et al.): y = causal_conv(x, k) + x * bias with an implicit long kernel
      k[t] = FFN(z(t)) * exp(-alpha_d t / seq_len): z(t) = (t / seq_len, cos, sin of 2 pi f t / seq_len
      for f = 1..bands), the FFN with sine activations, decay rates alpha_d spread per channel as in
      Hyena's exponential modulation. Any S (seq_len only normalises positions).

    Every mode is differentiable (input, filter, MLP, implicit-filter parameters); the forward and
    the input gradient run through the fused kernels (backend="auto": Triton on a GPU). The state dict
    records mode and seq_len; loading a checkpoint made with others raises.
    """

    def __init__(self, dim: int, seq_len: Optional[int] = None, mode: str = "filter", *,
                 hidden: Optional[int] = None, filter_std: float = 0.02, conv_order: int = 64,
                 conv_bands: int = 8, backend: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not is_int(dim) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if mode != "fnet" and (not is_int(seq_len) or seq_len < 1):
            raise ValueError(f"seq_len must be an int >= 1 for mode {mode!r}, got {seq_len!r}")
        if hidden is not None and (not is_int(hidden) or hidden < 1):
            raise ValueError(f"hidden must be None or an int >= 1, got {hidden!r}")
        try:
            std = float(filter_std)
        except (TypeError, ValueError, RuntimeError):
            std = math.nan
        if not 0 <= std < math.inf:
            raise ValueError(f"filter_std must be a finite number >= 0, got {filter_std!r}")
        dim, seq_len = int(dim), (int(seq_len) if is_int(seq_len) else seq_len)
        self.dim, self.seq_len, self.mode, self.backend = dim, seq_len, mode, check_backend(backend)
        if mode in ("filter", "adaptive"):
            # GFNet's complex_weight layout: [..., 2] real pairs, viewed as complex in forward
            self.filter = nn.Parameter(torch.randn(seq_len // 2 + 1, dim, 2) * filter_std)
        if mode == "adaptive":
            hidden = max(16, dim // 4) if hidden is None else int(hidden)
            self.context_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * dim))
            nn.init.zeros_(self.context_mlp[2].weight)
            nn.init.zeros_(self.context_mlp[2].bias)
        if mode == "conv":
            if not (is_int(conv_order) and is_int(conv_bands)) or conv_order < 1 or conv_bands < 0:
                raise ValueError(f"conv_order must be an int >= 1 and conv_bands an int >= 0, got {conv_order!r}, "
                                 f"{conv_bands!r}")
            conv_order, conv_bands = int(conv_order), int(conv_bands)
            self.conv_bands = conv_bands
            emb = 1 + 2 * conv_bands
            self.implicit_filter = nn.Sequential(
                nn.Linear(emb, conv_order), _Sin(conv_order), nn.Linear(conv_order, conv_order), _Sin(conv_order),
                nn.Linear(conv_order, dim))
            # Hyena's ExponentialModulation: decays reaching 1e-2 between 30% and 150% of the length
            target = math.log(1e-2)
            self.register_buffer("decay", torch.linspace(abs(target) / 1.5, abs(target) / 0.3, dim), persistent=False)
            self.bias = nn.Parameter(torch.randn(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, seq_len={self.seq_len}, mode={self.mode!r}, backend={self.backend!r}"

    def recorded_settings(self) -> dict:
        """Recorded in the state dict (RecordedSettings): a filter of seq_len 1024 and one of 1025
        have the same shape, and "conv" kernels of any seq_len the same parameters, but each computes
        another mixing. ("fnet" has no parameters and takes any length: its seq_len is not recorded.)"""
        return {"mode": self.mode} if self.mode == "fnet" else {"mode": self.mode, "seq_len": self.seq_len}

    def complex_filter(self) -> torch.Tensor:
        """The learnable filter W [S//2 + 1, D] as a complex tensor (modes "filter" and "adaptive"):
        complex64, or complex128 for a float64 module (after model.half() or .to(torch.bfloat16) the
        pairs are upcast: the op multiplies in float32 anyway, and half complex filters are refused)."""
        pairs = self.filter if self.filter.dtype == torch.float64 else self.filter.float()
        return torch.view_as_complex(pairs)

    def conv_kernel(self, s: int) -> torch.Tensor:
        """The implicit kernel k [s, D] of mode "conv" for a sequence of length s (in the parameters'
        dtype). Positions, their sine features and the decay envelope are computed in float32 (float64
        for a float64 module) and then rounded: in bfloat16 the positions themselves would collapse
        (only 256 integers are exact; 16384 positions gave 1025 distinct kernel rows)."""
        dev, dt = self.bias.device, self.bias.dtype
        ct = torch.float64 if dt == torch.float64 else torch.float32
        t = torch.arange(s, device=dev, dtype=ct)[:, None] / self.seq_len
        feats = [t]
        if self.conv_bands:
            f = torch.arange(1, self.conv_bands + 1, device=dev, dtype=ct)[None, :]
            feats += [torch.cos(2 * math.pi * f * t), torch.sin(2 * math.pi * f * t)]
        h = self.implicit_filter(torch.cat(feats, dim=1).to(dt))
        return h * torch.exp(-t * self.decay.to(ct)).to(dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.float64,))
        if x.dim() < 2 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., S, D] with D = {self.dim}, got {shape}")
        s = x.shape[-2]
        if self.mode == "fnet":
            return fnet_mix(x, backend=self.backend)
        if self.mode == "conv":
            k = self.conv_kernel(s)
            return fft_conv(x, k, causal=True, backend=self.backend) + x * self.bias.to(x.dtype)
        if s != self.seq_len:
            raise ValueError(f"x has sequence length {s}, but this {self.mode!r} mixer's filter is for "
                             f"seq_len = {self.seq_len}")
        filt = self.complex_filter()
        if self.mode == "adaptive":
            ctx = x.mean(dim=-2).to(self.filter.dtype)  # [..., D]
            m = self.context_mlp(ctx)
            m = m if m.dtype == torch.float64 else m.float()  # a complex32 gain would be refused
            gain = 1 + torch.complex(m[..., : self.dim], m[..., self.dim:])
            filt = filt * gain.unsqueeze(-2)  # [..., S//2 + 1, D], one filter per input
        return spectral_filter(x, filt, backend=self.backend)
