"""The machine's ceilings, measured once per report, and each result's achieved fraction of them.

Ceilings:
- bandwidth: a large device-to-device copy (dst.copy_(src)), counted as bytes read + bytes written;
- compute: a large matmul per dtype: fp32 (and tf32) / bf16 / fp16 through torch.mm, int8 through
  torch._int_mm, fp8 e4m3 through torch._scaled_mm (tensor-wise scales), where the machine runs them.
  On a CPU: fp32, int8 and fp8 (whatever torch's CPU kernels reach), at smaller sizes.

A result's roofline time is max(FLOPs / peak, bytes / bandwidth) with the case's stated counts
(lab/cases.py) and the peak of its compute dtype; its fraction is roofline time / measured median
(1.0 = at the roofline). The peak for a compute dtype is the highest of its own and the float32 ones
(fp32, and tf32 on a GPU: Triton's fp32 dots may use it): a kernel can always compute in float32,
so that peak bounds it too (on a CPU, where torch's int8/fp8 GEMMs are slower than fp32, this keeps
fractions meaningful); the row's note says when another dtype's peak was used.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .bench import time_cpu_interleaved, time_cuda


@dataclass
class Ceilings:
    device: str
    #: copy bandwidth in GB/s (read + write)
    bandwidth_gbs: float
    #: matmul peaks in TFLOP/s (TOP/s for int8), by compute dtype
    peaks_tflops: dict[str, float] = field(default_factory=dict)
    #: how each number was measured (size, op), or why it is missing
    details: dict[str, str] = field(default_factory=dict)

    def peak(self, compute: str) -> tuple[float, str]:
        """(peak TFLOP/s, the dtype whose peak it is) bounding an op of a compute dtype: the highest of
        that dtype's peak and the float32 ones (fp32, tf32). A kernel may always compute in float32,
        so the float32 peak is a ceiling for it too; on a GPU the narrow dtypes' peaks are the higher
        ones anyway, on a CPU (slow int8/fp8 GEMMs in torch) this keeps fractions below 1."""
        cands = [k for k in (compute, "fp32", "tf32") if self.peaks_tflops.get(k, 0.0) > 0]
        if not cands:
            return math.nan, compute
        best = max(cands, key=lambda k: self.peaks_tflops[k])
        return self.peaks_tflops[best], best

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Ceilings":
        """The ceilings written by to_json; ValueError naming what is wrong for anything else."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object of ceilings")
        try:
            return cls(device=str(data.get("device", "?")), bandwidth_gbs=float(data["bandwidth_gbs"]),
                       peaks_tflops={str(k): float(v) for k, v in dict(data.get("peaks_tflops") or {}).items()},
                       details={str(k): str(v) for k, v in dict(data.get("details") or {}).items()})
        except KeyError as e:
            raise ValueError(f"no {e} in the ceilings") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"ceilings of the wrong type ({e})") from None


def _time(fn, device: torch.device, budget_s: float) -> float:
    """Median ms of fn on the device."""
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms=25, rep_ms=max(50, int(budget_s * 1000)))[0]
    samples = time_cpu_interleaved({"f": fn}, budget_s=budget_s, min_reps=3, max_reps=50)["f"]
    return float(np.median(samples))


def measure(device: torch.device, needed: Optional[set[str]] = None, quick: bool = False) -> Ceilings:
    """Measure the copy bandwidth and the matmul peaks of `needed` compute dtypes (all when None)."""
    cuda = device.type == "cuda"
    needed = set(needed) if needed is not None else {"fp32", "bf16", "fp16", "int8", "fp8"}
    if cuda and "fp32" in needed:
        needed.add("tf32")
    budget = 0.3 if quick else 1.0
    ceil = Ceilings(device=str(device), bandwidth_gbs=math.nan)

    n_bytes = (1 << 30) if cuda else ((64 << 20) if quick else (256 << 20))
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), device, budget)
    ceil.bandwidth_gbs = 2 * n_bytes / (ms * 1e-3) / 1e9
    ceil.details["bandwidth"] = f"copy of {n_bytes >> 20} MiB (read + write)"
    del src, dst

    tf32_before = torch.backends.cuda.matmul.allow_tf32
    n_float = 8192 if cuda else (1024 if quick else 2048)
    n_small = 8192 if cuda else (512 if quick else 1024)
    for key in ("fp32", "tf32", "bf16", "fp16", "int8", "fp8"):
        if key not in needed:
            continue
        n = n_float if key in ("fp32", "tf32") else n_small
        try:
            fn, what = _matmul(key, n, device)
            fn()
            ms = _time(fn, device, budget)
            ceil.peaks_tflops[key] = 2.0 * n**3 / (ms * 1e-3) / 1e12
            ceil.details[key] = f"{what}, {n}^3"
        except Exception as e:  # no such kernel on this device/dtype
            ceil.details[key] = f"not measured ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})"
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32_before
            if cuda:
                torch.cuda.empty_cache()
    return ceil


def _matmul(key: str, n: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    if key in ("fp32", "tf32", "bf16", "fp16"):
        dt = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[key]
        a = torch.randn(n, n, generator=g, device=device).to(dt)
        b = torch.randn(n, n, generator=g, device=device).to(dt)
        c = torch.empty(n, n, dtype=dt, device=device)
        if key == "tf32":
            if device.type != "cuda":
                raise RuntimeError("tf32 is a GPU mode")

            def run():
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.mm(a, b, out=c)
            return run, "torch.mm with TF32"
        if device.type == "cuda":  # plain fp32 (tf32 is measured on its own)

            def run():
                torch.backends.cuda.matmul.allow_tf32 = dt != torch.float32
                torch.mm(a, b, out=c)
            return run, f"torch.mm {dt}".replace("torch.", "")
        return (lambda: torch.mm(a, b, out=c)), f"torch.mm {dt}".replace("torch.", "")
    if key == "int8":
        a = torch.randint(-127, 128, (n, n), generator=g, device=device, dtype=torch.int8)
        b = torch.randint(-127, 128, (n, n), generator=g, device=device, dtype=torch.int8)
        return (lambda: torch._int_mm(a, b.T)), "torch._int_mm"
    a = torch.randn(n, n, generator=g, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, generator=g, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    return (lambda: torch._scaled_mm(a, b.T, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)), \
        "torch._scaled_mm e4m3 (tensor scales)"


def annotate(df: pd.DataFrame, ceil: Ceilings) -> pd.DataFrame:
    """Add roofline_ms, roofline_frac and bound ("compute" | "memory") to each timed row."""
    df = df.copy()
    roof, frac, bound, notes = [], [], [], []
    bw = ceil.bandwidth_gbs
    for _, r in df.iterrows():
        peak, used = ceil.peak(str(r["compute"]))
        t_flop = r["flops"] / (peak * 1e12) if _positive(peak) else math.nan
        t_byte = r["bytes"] / (bw * 1e9) if _positive(bw) else math.nan
        terms = [t for t in (t_flop, t_byte) if t == t]
        t = max(terms) if terms else math.nan
        roof.append(t * 1e3)
        frac.append(t * 1e3 / r["median_ms"] if _positive(r["median_ms"]) and t == t else math.nan)
        bound.append("" if not terms else ("compute" if t == t_flop else "memory"))
        # (a row kept from an earlier report may carry this note already)
        note = "; ".join(p for p in str(r["note"] or "").split("; ") if p and not p.startswith("roofline against"))
        if r["status"] == "ok" and used != r["compute"] and used != "tf32":
            note = (note + "; " if note else "") + f"roofline against the {used} peak (higher than {r['compute']}'s here)"
        notes.append(note)
    df["roofline_ms"], df["roofline_frac"], df["bound"], df["note"] = roof, frac, bound, notes
    return df


def _positive(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        return False


def plot(df: pd.DataFrame, ceil: Ceilings, path: str) -> None:
    """Log-log roofline: achieved TFLOP/s against arithmetic intensity (FLOP/byte), with the measured
    roofs; our kernels filled, baselines hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[(df["status"] == "ok") & df["tflops"].notna() & (df["bytes"] > 0) & (df["flops"] > 0)]
    fig, ax = plt.subplots(figsize=(9, 6))
    ai = (ok["flops"] / ok["bytes"]).to_numpy(dtype=float)
    lo = min(ai.min() if len(ai) else 0.1, 0.1) / 2
    hi = max(ai.max() if len(ai) else 100.0, 100.0) * 2
    xs = np.logspace(np.log10(lo), np.log10(hi), 200)
    bw_tb = ceil.bandwidth_gbs / 1e3
    styles = ["-", "--", "-.", ":"]
    for i, (key, peak) in enumerate(sorted(ceil.peaks_tflops.items(), key=lambda kv: -kv[1])):
        ax.plot(xs, np.minimum(peak, xs * bw_tb), styles[i % len(styles)], color="0.3", lw=1,
                label=f"{key} {peak:.3g} TFLOP/s")
    ax.plot(xs, xs * bw_tb, color="0.7", lw=0.8, label=f"copy {ceil.bandwidth_gbs:.0f} GB/s")
    families = sorted(ok["family"].unique())
    colors = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for fam in families:
        sub = ok[ok["family"] == fam]
        mine, base = sub[sub["role"] == "ours"], sub[sub["role"] != "ours"]
        ax.scatter(mine["flops"] / mine["bytes"], mine["tflops"], color=colors[fam], s=36, label=f"{fam} (tritonlab)",
                   zorder=3)
        ax.scatter(base["flops"] / base["bytes"], base["tflops"], facecolors="none", edgecolors=colors[fam], s=30,
                   label=f"{fam} (baselines)", zorder=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, stated counts)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"Roofline: {ceil.device}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
