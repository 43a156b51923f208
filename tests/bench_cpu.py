"""CPU benchmarks of every report case as pytest-benchmark tests.

    pytest --benchmark-only -p no:cacheprovider tests/bench_cpu.py --benchmark-json bench.json
    tritonlab report --from-benchmark-json bench.json        # the report from those timings

The normal `pytest` run does not collect this file (it is not named test_*.py, and pyproject's
addopts has --benchmark-skip). TRITONLAB_BENCH_PRESET picks the shapes ("cpu" by default, "quick"
for a short run). Each benchmark checks its provider against the float64 reference first, exactly
as the report's harness does: a wrong result fails the test and is never timed. The row metadata
(kernel, shape, provider, FLOPs, bytes, error, ...) travels in extra_info for the report.
"""
from __future__ import annotations

import os

import pytest
import torch

from tritonlab import bench, cases
from tritonlab.kernels import _backend

PRESET = os.environ.get("TRITONLAB_BENCH_PRESET", "cpu")
DEVICE = torch.device("cpu")


def _params():
    out = []
    for case in cases.CASES:
        sweep = case.presets.get(PRESET)
        if sweep is None:
            continue
        for shape in sweep.shapes:
            for dtype in sweep.dtypes:
                for prov in case.providers(DEVICE, False, dtype):
                    out.append(pytest.param(case, shape, dtype, prov.name,
                                            id=f"{case.kernel}-{cases.shape_label(shape).replace(' ', ',')}-{dtype}-{prov.name}"))
    return out


@pytest.mark.parametrize("case, shape, dtype, provider", _params())
def test_cpu_benchmark(benchmark, monkeypatch, case, shape, dtype, provider):
    missing = case.missing()
    if missing:
        pytest.skip(f"{case.kernel}: not available yet ({', '.join(missing)})")
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", False)  # timings of the real allocation path
    checked = bench.check_task(bench.Task(case, shape, dtype), bench.BenchOptions(DEVICE), only=[provider])
    row = checked.row(provider)
    if row["status"] == "skipped":
        pytest.skip(row["note"])
    if row["status"] != "ok":
        pytest.fail(f"{provider} {row['status']}: {row['note']} (not timed)")
    benchmark.group = f"{case.kernel} {cases.shape_label(shape)} {dtype}"
    benchmark.extra_info.update({k: v for k, v in row.items() if k in bench.RESULT_COLUMNS and v is not None})
    benchmark.extra_info["preset"] = PRESET  # `tritonlab report --from-benchmark-json` labels the report with it
    benchmark(checked.ready[provider].fn)
