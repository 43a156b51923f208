"""Report plots (matplotlib, Agg): our speedup over each baseline per kernel and shape, and scaling
of time with the sweep variable (T, S or M). The roofline chart is in lab/roofline.py."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def speedup_plot(df: pd.DataFrame, family: str, path: str) -> Optional[str]:
    """Grouped bars, one panel per kernel: x = shape and dtype, one bar per baseline, height = our
    speedup over that baseline (baseline median / our median; > 1 means tritonlab is faster).
    Returns the path, or None when the family has no pair of timed results."""
    sp = pd.to_numeric(df["ours_speedup"], errors="coerce")
    # log axis: only positive finite speedups (a 0 or inf median, as in a hand-edited results.csv, has none)
    sub = df[(df["family"] == family) & (df["role"] == "baseline") & np.isfinite(sp) & (sp > 0)]
    if sub.empty:
        return None
    plt = _plt()
    from matplotlib import ticker

    kernels = list(dict.fromkeys(sub["kernel"]))
    fig, axes = plt.subplots(len(kernels), 1, figsize=(10, 3.4 * len(kernels)), squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        k = sub[sub["kernel"] == kernel]
        labels = list(dict.fromkeys(k["shape"] + "\n" + k["dtype"]))
        providers = list(dict.fromkeys(k["provider"]))
        width = 0.8 / max(len(providers), 1)
        x = np.arange(len(labels))
        for i, prov in enumerate(providers):
            p = k[k["provider"] == prov]
            heights = [p.loc[(p["shape"] + "\n" + p["dtype"]) == lab, "ours_speedup"].max() for lab in labels]
            heights = [h if h == h else 0.0 for h in heights]
            bars = ax.bar(x + (i - (len(providers) - 1) / 2) * width, heights, width, label=f"vs {prov}")
            for b, h in zip(bars, heights):
                if h > 0:
                    ax.annotate(f"{h:.3g}x", (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("tritonlab speedup (x)")
        ax.set_title(f"{family} / {kernel}: speedup over each baseline (higher is better)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_plot(df: pd.DataFrame, family: str, path: str) -> Optional[str]:
    """Median time against the sweep variable, one panel per kernel x fixed-parameters series x dtype
    that has at least two sizes; one line per provider (p20-p80 as error bars)."""
    med = pd.to_numeric(df["median_ms"], errors="coerce")
    sub = df[(df["family"] == family) & (df["status"] == "ok") & np.isfinite(med) & (med > 0) & df["size"].notna()]
    panels = []
    for (kernel, series, dtype), g in sub.groupby(["kernel", "series", "dtype"], sort=False):
        if g["size"].nunique() >= 2:
            panels.append((kernel, series, dtype, g))
    if not panels:
        return None
    plt = _plt()
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (kernel, series, dtype, g) in zip(axes.ravel(), panels):
        key = g["size_key"].iloc[0]
        for prov, p in g.groupby("provider", sort=False):
            p = p.sort_values("size")
            err = np.vstack([p["median_ms"] - p["p20_ms"], p["p80_ms"] - p["median_ms"]]).clip(min=0)
            style = "-o" if p["role"].iloc[0] == "ours" else "--s"
            ax.errorbar(p["size"], p["median_ms"], yerr=err, fmt=style, ms=4, capsize=2, label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("median ms")
        ax.set_title(f"{kernel} {series} {dtype}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
