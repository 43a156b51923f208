"""Audit of the report layer: a rebuilt report states and applies the same rules.

- FLOP/byte counts: `report --rebuild` recounts each row with the current counting rules (the ones
  the report prints per kernel), so a results.csv written under an older rule (fnet_mix counted a
  complex S transform of all D columns, 1.5x the current count) does not give TFLOP/s and roofline
  shares computed one way and described another.
- Timers: rows compared with each other but timed differently (an older harness timed short calls
  as CUDA graphs without an L2 flush under an eager provider name) are named in the report's notes.
- The summary's stated rule for the primary baseline names the exception for our own torch fallback.
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tritonlab import bench, cases, report

PEAK_TFLOPS = 0.001  # small enough that the fnet_mix rows below are compute-bound
BANDWIDTH_GBS = 1000.0


def _case(kernel: str) -> cases.Case:
    return next(c for c in cases.CASES if c.kernel == kernel)


def _row(case: cases.Case, shape: dict, dtype: str, provider: str, role: str, median: float, timer: str,
         flops: float, n_bytes: float) -> dict:
    row = {c: None for c in bench.RESULT_COLUMNS}
    row.update(family=case.family, kernel=case.kernel, shape=cases.shape_label(shape),
               series=cases.shape_label({k: v for k, v in shape.items() if k != case.size_key}),
               size_key=case.size_key, size=shape[case.size_key], dtype=dtype, provider=provider, role=role,
               status="ok", median_ms=median, p20_ms=median * 0.9, p80_ms=median * 1.1, reps=10, timer=timer,
               flops=flops, bytes=n_bytes, compute=case.compute(dtype), rel_err=1e-7, max_abs_err=1e-6,
               tolerance=1e-5, device="cuda", seed=1, note="")
    return row


def _fnet_flops(shape: dict) -> float:
    """fnet_mix's stated count: a real FFT along D per row (2.5 D log2 D) and a complex FFT along S
    (5 S log2 S) of the D/2 + 1 columns of the half spectrum, per batch element."""
    b, s, d = shape["B"], shape["S"], shape["D"]
    return b * (s * 2.5 * d * math.log2(d) + (d // 2 + 1) * 5 * s * math.log2(s))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    fnet, fff = _case("fnet_mix"), _case("fff_forward")
    fnet_shape = fnet.presets["cpu"].shapes[0]
    fff_shape = fff.presets["cpu"].shapes[0]
    stale = 1.5 * _fnet_flops(fnet_shape)  # the older rule's count, as in the H100 report's results.csv
    fnet_bytes = float(fnet.bytes(fnet_shape, "float32"))
    fff_flops, fff_bytes = float(fff.flops(fff_shape)), float(fff.bytes(fff_shape, "float32"))
    flushed = "do_bench (L2 flushed)"
    rows = [
        _row(fnet, fnet_shape, "float32", "tritonlab", "ours", 2.0, flushed, stale, fnet_bytes),
        _row(fnet, fnet_shape, "float32", cases.OWN_FALLBACK, "baseline", 2.5, flushed, stale, fnet_bytes),
        _row(fnet, fnet_shape, "float32", "torch.fft", "baseline", 3.0, flushed, stale, fnet_bytes),
        _row(fff, fff_shape, "float32", "tritonlab", "ours", 0.08, flushed, fff_flops, fff_bytes),
        _row(fff, fff_shape, "float32", "dense-ffn", "baseline", 0.01, "CUDA graph", fff_flops, fff_bytes),
    ]
    pd.DataFrame(rows, columns=bench.RESULT_COLUMNS).to_csv(src / "results.csv", index=False)
    (src / "roofline.json").write_text(json.dumps({"device": "cuda", "bandwidth_gbs": BANDWIDTH_GBS,
                                                   "peaks_tflops": {"fp32": PEAK_TFLOPS}, "details": {}}))
    (src / "environment.json").write_text(json.dumps({"device": "test", "date": "then", "commit": "abc"}))
    out = tmp_path_factory.mktemp("out")
    report.rebuild(src, out)
    return {"shape": fnet_shape, "csv": pd.read_csv(out / "results.csv"), "readme": (out / "README.md").read_text()}


def test_rebuild_applies_the_counting_rule_it_states(rebuilt):
    df = rebuilt["csv"]
    fnet = df[df["kernel"] == "fnet_mix"]
    want = _fnet_flops(rebuilt["shape"])
    assert len(fnet) == 3
    assert fnet["flops"].to_numpy() == pytest.approx([want] * 3, rel=1e-9)
    ours = fnet[fnet["provider"] == "tritonlab"].iloc[0]
    assert ours["tflops"] == pytest.approx(want / (2.0e-3) / 1e12, rel=1e-9)
    # compute-bound at this peak: the roofline share follows the count the report states
    assert ours["roofline_frac"] == pytest.approx(want / (PEAK_TFLOPS * 1e12) * 1e3 / 2.0, rel=1e-9)
    assert "FLOPs and bytes of fnet_mix recounted" in rebuilt["readme"]
    # the stated rule is the one printed per kernel
    assert "D/2 + 1 columns" in rebuilt["readme"]


def test_rebuild_names_rows_compared_across_timers(rebuilt):
    notes = rebuilt["readme"].split("## Notes", 1)
    assert len(notes) == 2, "no Notes section"
    notes = notes[1].split("\n## ", 1)[0]
    assert "dense-ffn by CUDA graph" in notes
    assert "fff_forward" in notes
    assert "fnet_mix" not in notes.split("recounted", 1)[1]  # its rows share one timer


def test_summary_states_the_fallback_exception_it_applies(rebuilt):
    df = rebuilt["csv"]
    ours = df[(df["kernel"] == "fnet_mix") & (df["provider"] == "tritonlab")].iloc[0]
    # our own fallback comes first in the case's order, yet the external baseline is the primary
    assert ours["primary_baseline"] == "torch.fft"
    assert ours["speedup"] == pytest.approx(3.0 / 2.0)
    summary = rebuilt["readme"].split("## Summary", 1)[1].split("\n|", 1)[0]
    assert f"other than our own torch fallback ({cases.OWN_FALLBACK}) unless it is the only one" in summary
