"""The lab: harness (check before timing), report files, CSV schema, --compare, pytest-benchmark JSON in."""
from __future__ import annotations

import dataclasses
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tritonlab import bench, cases, report, roofline  # noqa: E402
from tritonlab.cases import Case, Prepared, Provider, Sweep, Unavailable, default_error  # noqa: E402
from tritonlab.cli import main as cli_main  # noqa: E402

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = dict(cpu_budget_s=0.02, cpu_min_reps=2, cpu_max_reps=5)


# ----------------------------------------------------------------------------- a toy case


def toy_case(ours_fn, extra: tuple[Provider, ...] = (), kernel: str = "toy_tanh", family: str = "toy") -> Case:
    """y = tanh(x) on [T, D]; `ours_fn(x)` is the op under test, torch.tanh the baseline."""
    def make_inputs(shape, dtype, device, g):
        return {"x": torch.randn(shape["T"], shape["D"], generator=g, device=device)}

    def providers(device, compile_baselines, dtype):
        return [Provider("tritonlab", "ours", lambda i, d: Prepared(lambda: ours_fn(i["x"]))),
                Provider("torch", "baseline", lambda i, d: Prepared(lambda: torch.tanh(i["x"])))] + list(extra)

    return Case(family=family, kernel=kernel, requires=(),
                presets={"tiny": Sweep([{"T": 33, "D": 7}, {"T": 65, "D": 7}], ("float32",))},
                make_inputs=make_inputs, reference=lambda np_inp: np.tanh(np_inp["x"]), error=default_error,
                tolerance=lambda dtype, device: 5e-6, flops=lambda s: 20.0 * s["T"] * s["D"],
                bytes=lambda s, dtype: 8.0 * s["T"] * s["D"], compute=lambda dtype: "fp32", providers=providers,
                rows_of=lambda s: (s["T"], s["D"]), counting="toy: 20 FLOPs and 8 bytes per element")


def run_toy(case: Case, shape=None) -> dict[str, dict]:
    shape = shape or case.presets["tiny"].shapes[0]
    rows = bench.run_task(bench.Task(case, shape, "float32"), bench.BenchOptions(CPU, **FAST))
    return {r["provider"]: r for r in rows}


# ----------------------------------------------------------------------------- harness


def test_harness_refuses_to_time_a_wrong_kernel():
    calls = {"wrong": 0, "nan": 0}

    def wrong(x):  # 1% off: far over the float32 tolerance
        calls["wrong"] += 1
        return torch.tanh(x) * 1.01

    def nan_row(x):  # one unwritten row, as a kernel that skips a tile would leave it
        calls["nan"] += 1
        y = torch.tanh(x)
        y[-1] = float("nan")
        return y

    case = toy_case(wrong, extra=(Provider("nan-op", "baseline", lambda i, d: Prepared(lambda: nan_row(i["x"]))),))
    rows = run_toy(case)
    for name in ("tritonlab", "nan-op"):
        r = rows[name]
        assert r["status"] == "wrong", r
        assert r["median_ms"] is None and r["p20_ms"] is None and r["reps"] is None
        assert "not timed" in r["note"]
    assert rows["tritonlab"]["rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert math.isinf(rows["nan-op"]["rel_err"])
    assert calls == {"wrong": 1, "nan": 1}  # run once for the check, never again
    assert rows["torch"]["status"] == "ok" and rows["torch"]["median_ms"] > 0
    assert rows["torch"]["p20_ms"] <= rows["torch"]["median_ms"] <= rows["torch"]["p80_ms"]
    df = bench.finalize(bench.to_frame(list(rows.values())))
    ours = df[df["provider"] == "tritonlab"].iloc[0]
    assert math.isnan(ours["median_ms"]) and math.isnan(ours["speedup"]) and math.isnan(ours["tflops"])


def test_harness_reports_failed_and_skipped_providers():
    def boom(i, d):
        return Prepared(lambda: (_ for _ in ()).throw(RuntimeError("kernel exploded")))

    def unavailable(i, d):
        raise Unavailable("needs an sm90 GPU")

    case = toy_case(torch.tanh, extra=(Provider("boom", "baseline", boom), Provider("absent", "baseline", unavailable)))
    rows = run_toy(case)
    assert rows["tritonlab"]["status"] == "ok" and rows["tritonlab"]["median_ms"] > 0
    assert rows["boom"]["status"] == "failed" and "kernel exploded" in rows["boom"]["note"]
    assert rows["absent"]["status"] == "skipped" and "sm90" in rows["absent"]["note"]
    assert rows["boom"]["median_ms"] is None and rows["absent"]["median_ms"] is None


def test_cpu_timing_interleaves_pairs():
    log = []
    fns = {name: (lambda n=name: log.append(n)) for name in "ABC"}
    samples = bench.time_cpu_interleaved(fns, budget_s=0.0, min_reps=4, max_reps=4, warmup=1, sample_s=0.0)
    assert {k: len(v) for k, v in samples.items()} == {"A": 4, "B": 4, "C": 4}
    timed = "".join(log[6:])  # after one warm-up call and one estimate call each
    assert timed == "ABCCBAABCCBA"


def test_pick_rows_bounds():
    rng = np.random.default_rng(0)
    rows = bench.pick_rows(1000, 10, rng, max_rows=50, max_elements=10**6)
    assert len(rows) == 50 and rows[0] == 0 and rows[-1] == 999 and np.all(np.diff(rows) > 0)
    assert list(bench.pick_rows(1, 10, rng)) == [0]
    assert len(bench.pick_rows(0, 10, rng)) == 0
    assert len(bench.pick_rows(64, 10**7, rng, max_elements=10**6)) == 1  # one huge row is enough


def test_plan_skips_families_not_available_with_a_note():
    missing = dataclasses.replace(toy_case(torch.tanh), requires=("no_such_op",))
    tasks, skipped, notes = bench.plan([missing, toy_case(torch.tanh, kernel="toy2")], "tiny", CPU)
    assert [t.case.kernel for t in tasks] == ["toy2", "toy2"]
    assert len(skipped) == 2 and all(r["status"] == "skipped" and "no_such_op" in r["note"] for r in skipped)
    assert any("no_such_op" in n for n in notes)


# ----------------------------------------------------------------------------- the real cases, tiny


TINY = {
    "fff_forward": ({"T": 37, "D": 24, "depth": 3, "H": 5}, ("float32",)),
    "tree_route": ({"T": 37, "D": 24, "depth": 3}, ("float32",)),
    "fff_path_forward": ({"T": 37, "D": 24, "depth": 3}, ("float32",)),
    "gather_matmul_scatter": ({"T": 37, "G": 5, "k": 2, "D": 24, "H": 16}, ("float32",)),
    "leaf_mlp": ({"T": 37, "G": 5, "k": 1, "D": 24, "H": 16, "act": "relu"}, ("float32",)),
    "quantize": ({"M": 37, "N": 24, "x": "float32"}, ("int8", "fp8_e4m3")),
    "scaled_matmul": ({"M": 40, "N": 24, "K": 32}, ("int8", "fp8_e4m3")),
    "QuantizedFFN": ({"T": 37, "D": 24, "H": 40, "x": "float32"}, ("int8",)),
    "fnet_mix": ({"B": 3, "S": 37, "D": 8}, ("float32",)),
    "spectral_filter": ({"B": 3, "S": 37, "D": 8}, ("float32",)),
    "fft_conv": ({"B": 3, "S": 37, "D": 8}, ("float32",)),
}


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.kernel)
def test_real_case_checks_and_times_at_a_tiny_shape(case):
    """Every provider of every available case passes its reference check (a baseline may be
    skipped where its torch op does not exist); nothing is wrong or failed."""
    if case.missing():
        pytest.skip(f"not available yet: {case.missing()}")
    shape, dtypes = TINY[case.kernel]
    for dtype in dtypes:
        rows = bench.run_task(bench.Task(case, shape, dtype), bench.BenchOptions(CPU, **FAST))
        assert rows[0]["role"] == "ours"
        for r in rows:
            allowed = ("ok",) if r["role"] == "ours" else ("ok", "skipped")
            assert r["status"] in allowed, f"{case.kernel} {dtype} {r['provider']}: {r['status']} {r['note']}"
            if r["status"] == "ok":
                assert r["median_ms"] > 0 and r["rel_err"] <= r["tolerance"]


def test_case_metadata_is_complete():
    names = set()
    for case in cases.CASES:
        assert set(case.presets) == set(cases.PRESETS), case.kernel
        assert case.family in cases.FAMILIES and case.counting
        for preset, sweep in case.presets.items():
            for shape in sweep.shapes:
                assert case.size_key in shape
                for dtype in sweep.dtypes:
                    assert case.flops(shape) > 0 and case.bytes(shape, dtype) > 0
                    assert case.compute(dtype) in ("fp32", "bf16", "fp16", "int8", "fp8")
        for device in (CPU, torch.device("cuda")):
            provs = case.providers(device, True, case.presets["quick"].dtypes[0])
            assert provs[0].role == "ours" and provs[0].name == "tritonlab"
            # besides the eager row, "ours" only in its CUDA-graph variant, and that only on a GPU
            assert all(p.role == "baseline" or (p.name == "tritonlab-cudagraph" and device.type == "cuda")
                       for p in provs[1:])
            assert len({p.name for p in provs}) == len(provs)
        names.add(case.kernel)
    assert {"fff_forward", "gather_matmul_scatter", "scaled_matmul", "fnet_mix"} <= names
    assert [c.kernel for c in cases.select(["tree_routing"])] == ["fff_forward", "tree_route", "fff_path_forward"]
    with pytest.raises(ValueError, match="no_such"):
        cases.select(["no_such"])


# ----------------------------------------------------------------------------- the report


def synthetic_results() -> pd.DataFrame:
    """Two families, a scaling sweep, and one row of every status."""
    rows = []
    for family, kernel in (("toy", "toy_tanh"), ("other", "toy_exp")):
        case = toy_case(torch.tanh, kernel=kernel, family=family)
        for t in (64, 128, 256):
            shape = {"T": t, "D": 7}
            rows.append(bench._row(case, shape, "float32", "tritonlab", "ours", CPU, status="ok", median_ms=0.01 * t,
                                   p20_ms=0.009 * t, p80_ms=0.011 * t, reps=9, rel_err=1e-7, tolerance=5e-6, seed=1))
            rows.append(bench._row(case, shape, "float32", "torch", "baseline", CPU, status="ok", median_ms=0.03 * t,
                                   p20_ms=0.028 * t, p80_ms=0.033 * t, reps=9, rel_err=0.0, tolerance=5e-6, seed=1))
            rows.append(bench._row(case, shape, "float32", "dense", "baseline", CPU, status="ok", median_ms=0.05 * t,
                                   p20_ms=0.04 * t, p80_ms=0.06 * t, reps=9, rel_err=0.0, tolerance=5e-6, seed=1))
        rows.append(bench._row(case, {"T": 64, "D": 7}, "float32", "bad-op", "baseline", CPU, status="wrong",
                               rel_err=0.3, tolerance=5e-6, note="relative error 0.3 > tolerance: not timed"))
        rows.append(bench._row(case, {"T": 64, "D": 7}, "float32", "absent-op", "baseline", CPU, status="skipped",
                               note="needs a GPU"))
    return bench.finalize(bench.to_frame(rows))


CEILINGS = roofline.Ceilings(device="cpu", bandwidth_gbs=10.0, peaks_tflops={"fp32": 0.1},
                             details={"bandwidth": "synthetic", "fp32": "synthetic"})
ENV = {"device": "cpu", "torch": torch.__version__, "triton": None, "commit": "abc123", "date": "2025-01-01 00:00 UTC"}


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    df = roofline.annotate(synthetic_results(), CEILINGS)
    out = report.write_report(df, CEILINGS, tmp_path_factory.mktemp("rep"), env=dict(ENV), source="synthetic",
                              notes=["a note"], selected=[toy_case(torch.tanh)])
    return df, out


def test_report_from_synthetic_results(synthetic_report):
    df, out = synthetic_report
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "results.csv", "roofline.json", "environment.json", "roofline.png",
            "speedup_toy.png", "speedup_other.png", "scaling_toy.png", "scaling_other.png"} <= files
    for name in files:
        if name.endswith(".png"):
            data = (out / name).read_bytes()
            assert data[:8] == PNG_SIGNATURE, name
            img = mpimg.imread(out / name)
            assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
    readme = (out / "README.md").read_text()
    for png in (n for n in files if n.endswith(".png")):
        assert f"]({png})" in readme  # every plot inline
    table_lines = [ln for ln in readme.splitlines() if ln.startswith("| toy_") or ln.startswith("| toy |")
                   or ln.startswith("| other |")]
    for _, r in df.iterrows():  # each result row is a table line with its provider, shape and status
        assert any(r["kernel"] in ln and r["shape"] in ln and r["provider"] in ln and r["status"] in ln
                   for ln in table_lines), (r["kernel"], r["shape"], r["provider"])
    assert "3x" in readme  # torch/tritonlab = 0.03 / 0.01: the speedup over the primary baseline
    assert "a note" in readme and "abc123" in readme and "toy: 20 FLOPs" in readme
    back = report.load_results(out)
    assert len(back) == len(df) and list(back.columns) == bench.RESULT_COLUMNS
    assert json.loads((out / "roofline.json").read_text())["bandwidth_gbs"] == 10.0


def test_results_csv_schema(synthetic_report):
    back = pd.read_csv(synthetic_report[1] / "results.csv")
    assert list(back.columns) == bench.RESULT_COLUMNS
    assert set(back["status"]) <= set(bench.STATUSES) and set(back["role"]) <= {"ours", "baseline"}
    ok = back[back["status"] == "ok"]
    assert (ok["median_ms"] > 0).all() and (ok["p20_ms"] <= ok["median_ms"]).all() and (ok["median_ms"] <= ok["p80_ms"]).all()
    assert back.loc[back["status"] != "ok", "median_ms"].isna().all()  # no time for wrong/skipped rows
    ours = ok[ok["role"] == "ours"]
    assert np.allclose(ours["speedup"], 3.0) and (ours["primary_baseline"] == "torch").all()
    dense = ok[ok["provider"] == "dense"]
    assert np.allclose(dense["ours_speedup"], 5.0)  # tritonlab over this baseline
    assert np.allclose(ok["tflops"], ok["flops"] / (ok["median_ms"] * 1e-3) / 1e12)
    assert np.allclose(ok["gbps"], ok["bytes"] / (ok["median_ms"] * 1e-3) / 1e9)
    # roofline: 8 bytes/element at 10 GB/s (0.8 ns) vs 20 FLOPs/element at 0.1 TFLOP/s (0.2 ns): memory bound
    assert (ok["bound"] == "memory").all() and np.allclose(ok["roofline_ms"], ok["bytes"] / 10e9 * 1e3)
    assert np.allclose(ok["roofline_frac"], ok["roofline_ms"] / ok["median_ms"])


def test_compare_flags_a_planted_regression(tmp_path, capsys):
    a = roofline.annotate(synthetic_results(), CEILINGS)
    b = a.copy()
    slow = (b["role"] == "ours") & (b["kernel"] == "toy_tanh") & (b["size"] == 128)
    b.loc[slow, "median_ms"] *= 1.5
    b.loc[(b["provider"] == "torch") & (b["size"] == 64), "median_ms"] *= 2.0  # a baseline: not flagged
    b.loc[(b["role"] == "ours") & (b["size"] == 256), "median_ms"] *= 1.05  # within the threshold
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    a.to_csv(tmp_path / "A" / "results.csv", index=False)
    b.to_csv(tmp_path / "B" / "results.csv", index=False)

    m = report.compare(report.load_results(tmp_path / "A"), report.load_results(tmp_path / "B"))
    flagged = m[m["regression"]]
    assert len(flagged) == 1 and flagged.iloc[0]["kernel"] == "toy_tanh" and flagged.iloc[0]["shape"] == "T=128 D=7"
    assert flagged.iloc[0]["change"] == pytest.approx(0.5)
    assert len(report.compare(report.load_results(tmp_path / "A"), report.load_results(tmp_path / "B"),
                              all_providers=True).query("regression")) == 3
    assert cli_main(["report", "--compare", str(tmp_path / "A"), str(tmp_path / "B")]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert cli_main(["report", "--compare", str(tmp_path / "A"), str(tmp_path / "A")]) == 0

    broken = a.copy()  # ok -> wrong is a regression too
    idx = broken.index[(broken["role"] == "ours") & (broken["size"] == 64)][0]
    broken.loc[idx, ["status", "median_ms"]] = ["wrong", np.nan]
    m = report.compare(a, broken)
    assert m["regression"].sum() == 1 and set(m.loc[m["regression"], "why"]) == {"now wrong"}


def test_compare_counts_a_repeated_row_once(tmp_path, capsys):
    """Results concatenated by hand can list a key twice: it is compared once, by its last (later)
    row, and the only-in counts stay right."""
    a = roofline.annotate(synthetic_results(), CEILINGS)
    ours = a.index[(a["role"] == "ours") & (a.index != a.index[0])][0]
    older = a.loc[[ours]].assign(median_ms=a.loc[ours, "median_ms"] * 3.0)  # an older, slower run of that row
    b = pd.concat([older, a.iloc[1:]])  # B: that row twice (the older first), A's first row missing
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    m = report.compare(a, b)
    assert len(m) == len(a) - 1 and not m["regression"].any()  # the later row is A's own time
    assert cli_main(["report", "--compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == 0
    assert f"{len(a) - 1} rows compared, 1 only in A, 0 only in B" in " ".join(capsys.readouterr().out.split())


def test_compare_that_cannot_be_made_exits_2(tmp_path, capsys):
    """Exit 1 means regressions; a comparison that could not be made is 2 with a message, never a
    traceback (found by fuzzing: pandas errors surfaced with status 1, and an empty B passed)."""
    a = roofline.annotate(synthetic_results(), CEILINGS)
    good = tmp_path / "good.csv"
    a.to_csv(good, index=False)
    bad = {"empty.csv": "", "garbled.csv": 'a,b\n1,"2\n', "columns.csv": "kernel,shape\nx,y\n",
           "header_only.csv": ",".join(a.columns) + "\n", "binary.csv": None}
    for name, text in bad.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(bytes(range(256)) * 4)
        else:
            path.write_text(text)
        assert cli_main(["report", "--compare", str(good), str(path)]) == 2, name
        assert "tritonlab report --compare" in capsys.readouterr().err
    for threshold in ("nan", "-0.1"):
        assert cli_main(["report", "--compare", str(good), str(good), "--threshold", threshold]) == 2
    assert cli_main(["report", "--compare", str(good), str(good)]) == 0


def test_report_from_benchmark_json(tmp_path):
    case = toy_case(torch.tanh)
    benchmarks = []
    for prov, role, secs in (("tritonlab", "ours", 0.002), ("torch", "baseline", 0.006)):
        info = {k: v for k, v in bench._row(case, {"T": 64, "D": 7}, "float32", prov, role, CPU, rel_err=0.0,
                                            tolerance=5e-6, status="ok").items() if v is not None}
        benchmarks.append({"name": f"test[{prov}]", "group": "g", "extra_info": info,
                           "stats": {"min": secs * 0.9, "max": secs * 1.2, "mean": secs, "median": secs,
                                     "q1": secs * 0.95, "q3": secs * 1.1, "rounds": 7, "iterations": 1}})
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine_info": {}, "datetime": "2025-01-01T00:00:00", "benchmarks": benchmarks}))
    rows, notes, preset = report.rows_from_benchmark_json(str(path))
    assert preset is None  # these rows name no preset
    df = bench.finalize(bench.to_frame(rows))
    ours = df[df["role"] == "ours"].iloc[0]
    assert ours["median_ms"] == pytest.approx(2.0) and ours["p20_ms"] == pytest.approx(1.9)
    assert ours["speedup"] == pytest.approx(3.0) and ours["timer"] == "pytest-benchmark"
    assert any("quartiles" in n for n in notes)
    out = report.write_report(roofline.annotate(df, CEILINGS), CEILINGS, tmp_path / "rep", env=dict(ENV), notes=notes)
    assert "pytest-benchmark" in (out / "README.md").read_text()


def test_partial_run_keeps_the_other_kernels_rows(synthetic_report, tmp_path):
    df, _ = synthetic_report
    out = report.write_report(df, CEILINGS, tmp_path, env=dict(ENV), extra_env={"preset": "quick"})
    kept, note = report._kept_rows(out, [toy_case(torch.tanh)], "quick")  # re-measuring toy_tanh only
    assert kept and {r["kernel"] for r in kept} == {"toy_exp"} and "toy_exp" in note
    assert len(kept) == int((df["kernel"] == "toy_exp").sum())
    assert report._kept_rows(out, [toy_case(torch.tanh)], "cpu") == ([], "")  # another preset: nothing kept


def test_a_run_of_another_preset_does_not_replace_a_report_unasked(synthetic_report, tmp_path, capsys):
    """`report --quick --kernel quantize` into a folder holding the full CPU report used to keep none of
    its rows (they are kept only within one preset) and silently left a report of 4 rows; the run now
    refuses before measuring, and --replace lets it go ahead."""
    df, _ = synthetic_report
    out = report.write_report(df, CEILINGS, tmp_path / "rep", env=dict(ENV), extra_env={"preset": "cpu"})
    before = (out / "results.csv").read_text()
    argv = ["report", "--quick", "--kernel", "quantize", "--device", "cpu", "--no-progress", "--out", str(out),
            "--time-limit", "0"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a report of preset 'cpu'" in err and "--replace" in err
    assert (out / "results.csv").read_text() == before
    assert cli_main(argv + ["--replace"]) == 0  # (a time limit of 0 s: every task skipped, and listed)
    assert json.loads((out / "environment.json").read_text())["preset"] == "quick"


def test_a_benchmark_json_report_takes_its_preset_from_the_json(synthetic_report, tmp_path, capsys):
    """tests/bench_cpu.py records TRITONLAB_BENCH_PRESET in each row; the report is labelled with it,
    and the preset guard compares it (the CLI default 'cpu' would have let a 'quick' JSON replace the
    full CPU report)."""
    info = {k: v for k, v in bench._row(toy_case(torch.tanh), {"T": 64, "D": 7}, "float32", "tritonlab", "ours", CPU,
                                        rel_err=0.0, tolerance=5e-6, status="ok").items() if v is not None}
    stats = {"min": 0.001, "max": 0.002, "mean": 0.0015, "median": 0.0015, "q1": 0.0014, "q3": 0.0016, "rounds": 5}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"datetime": "2025-01-01T00:00:00", "benchmarks": [
        {"name": "t", "extra_info": dict(info, preset="quick"), "stats": stats}]}))
    assert report.rows_from_benchmark_json(str(path))[2] == "quick"
    df, _ = synthetic_report
    out = report.write_report(df, CEILINGS, tmp_path / "rep", env=dict(ENV), extra_env={"preset": "cpu"})
    argv = ["report", "--from-benchmark-json", str(path), "--device", "cpu", "--out", str(out)]
    assert cli_main(argv) == 2
    assert "holds a report of preset 'cpu', which this 'quick' run" in capsys.readouterr().err
    assert cli_main(argv + ["--replace"]) == 0
    assert json.loads((out / "environment.json").read_text())["preset"] == "quick"


def test_profile_command_writes_a_table(tmp_path, capsys):
    """`tritonlab profile` checks our op, then tabulates issue/wall time and the heaviest torch ops."""
    out = tmp_path / "profile.md"
    assert cli_main(["profile", "--kernel", "tree_route", "--preset", "quick", "--calls", "2", "--out", str(out)]) == 0
    text = out.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith("| tree_route |")]
    assert len(lines) == len(cases.select(["tree_route"])[0].presets["quick"].shapes)
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert float(cells[3].split()[0]) > 0 and float(cells[4].split()[0]) > 0  # issue and wall times
        if torch.cuda.is_available():  # the device trace: the heaviest kernels, ours among them
            assert "tree_walk_kernel" in cells[-1]
        else:  # the heaviest torch ops of the fallback
            assert "aten::" in cells[-1]
    # on a GPU the floors of an issue: an empty Triton launch and an allocation (no such line on a CPU)
    assert ("Issue-time floors on this host" in text) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert "triton launch" in text and "torch.empty 1 KiB" in text


def test_profile_of_a_failing_op_is_reported_not_hidden(tmp_path, monkeypatch):
    from tritonlab import profiling

    def wrong_check(task, opts, only=None):
        return bench.Checked([{"provider": "tritonlab", "status": "wrong", "note": "rel err 3"}])
    monkeypatch.setattr(profiling.bench, "check_task", wrong_check)
    out = tmp_path / "p.md"
    assert cli_main(["profile", "--kernel", "tree_route", "--preset", "quick", "--out", str(out)]) == 1
    assert "wrong: rel err 3" in out.read_text()


def test_output_paths_are_checked_before_the_run(tmp_path, capsys):
    """An output path that cannot be written is a usage error (exit 2) before anything is measured,
    not a crash when the results are written at the end."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    bad = [["report", "--out", str(a_file)],                        # a file where a folder is wanted
           ["report", "--out", str(a_file / "sub")],                # a folder under a file
           ["profile", "--out", str(tmp_path)],                     # a folder where a file is wanted
           ["profile", "--out", str(a_file / "p.md")],
           ["autotune", "--vs-triton-autotune", "--out", str(a_file / "t.md")],
           ["compile-check", "--json", str(a_file / "rows.json")]]
    for argv in bad:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2, argv
        err = capsys.readouterr().err
        assert "--out" in err or "--json" in err, argv
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_package_lists_its_public_api():
    """dir(tritonlab) shows the lazily re-exported ops and modules (tab completion, help())."""
    import tritonlab

    names = dir(tritonlab)
    assert set(tritonlab.__all__) <= set(names)
    for name in ("fff_forward", "gather_matmul_scatter", "scaled_matmul", "fft_conv", "FastFeedForward"):
        assert name in names and callable(getattr(tritonlab, name))


def test_own_fallback_is_never_the_primary_baseline():
    """Our torch fallback (timed beside the kernels on a GPU) is not what a user would pick instead
    of tritonlab: the summary compares with the first other baseline that ran (a review found every
    H100 summary row but one quoted against it: scaled_matmul fp8 '27.7x', 1.24x against
    torch._scaled_mm). Alone, it is still the primary."""
    case = toy_case(torch.tanh)
    shape = {"T": 64, "D": 7}

    def row(provider, role, ms):
        return bench._row(case, shape, "float32", provider, role, CPU, status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms,
                          reps=3, rel_err=0.0, tolerance=1e-6, seed=1)

    both = bench.finalize(bench.to_frame([row("tritonlab", "ours", 1.0), row(cases.OWN_FALLBACK, "baseline", 20.0),
                                          row("torch._scaled_mm", "baseline", 1.5)]))
    ours = both[both["role"] == "ours"].iloc[0]
    assert ours["primary_baseline"] == "torch._scaled_mm" and ours["speedup"] == pytest.approx(1.5)
    alone = bench.finalize(bench.to_frame([row("tritonlab", "ours", 1.0), row(cases.OWN_FALLBACK, "baseline", 20.0)]))
    assert alone[alone["role"] == "ours"].iloc[0]["primary_baseline"] == cases.OWN_FALLBACK
    # a faster baseline than the primary is shown beside it, with our speedup over it
    faster = bench.finalize(bench.to_frame([row("tritonlab", "ours", 1.0), row("torch-dense", "baseline", 3.0),
                                            row("torch-naive", "baseline", 0.5), row(cases.OWN_FALLBACK, "baseline", 0.1)]))
    line = next(ln for ln in report.summary_table(faster).splitlines() if "toy" in ln)
    assert "| torch-dense | 3 | 3x | torch-naive 0.5 ms: 0.5x |" in line


def test_captured_rows_are_compared_only_with_captured_rows(monkeypatch):
    """One timer per comparison: a call captured in a CUDA graph pays no host launch overhead, so
    its speedup is over the captured baselines, and eager rows are compared only with eager ones
    (the H100 report of session 6 set a graph-timed dense FFN against our eager row)."""
    case = toy_case(torch.tanh)
    shape = {"T": 64, "D": 7}
    g = cases.GRAPH_SUFFIX

    def row(provider, role, ms):
        return bench._row(case, shape, "float32", provider, role, CPU, status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms,
                          reps=3, rel_err=0.0, tolerance=1e-6, seed=1)

    df = bench.finalize(bench.to_frame([
        row("tritonlab", "ours", 0.4), row(cases.OWN_FALLBACK, "baseline", 4.0), row("dense-ffn", "baseline", 0.3),
        row("tritonlab" + g, "ours", 0.05), row("dense-ffn" + g, "baseline", 0.25)]))
    by = df.set_index("provider")
    assert by.loc["tritonlab", "primary_baseline"] == "dense-ffn" and by.loc["tritonlab", "speedup"] == pytest.approx(0.75)
    assert by.loc["tritonlab" + g, "primary_baseline"] == "dense-ffn" + g
    assert by.loc["tritonlab" + g, "speedup"] == pytest.approx(5.0)
    assert by.loc["dense-ffn" + g, "ours_speedup"] == pytest.approx(5.0)
    assert by.loc["dense-ffn", "ours_speedup"] == pytest.approx(0.75)
    line = next(ln for ln in report.summary_table(df).splitlines() if "toy" in ln)
    assert "| 0.4 | dense-ffn | 0.3 | 0.75x |" in line and f"| 0.05 ms: 5x dense-ffn{g} |" in line
    # a captured row of ours with no captured baseline has no speedup (never one over an eager row)
    alone = bench.finalize(bench.to_frame([row("tritonlab", "ours", 0.4), row("dense-ffn", "baseline", 0.3),
                                           row("tritonlab" + g, "ours", 0.05)]))
    assert math.isnan(alone.set_index("provider").loc["tritonlab" + g, "speedup"])
    # without captured rows (a CPU report) the summary has no graph column
    assert "CUDA graphs" not in report.summary_table(df[~df["provider"].str.endswith(g)])


def test_graph_safe_baselines_get_captured_twins_on_a_gpu(monkeypatch):
    """Where our op has a captured row, each graph-safe baseline gets one too, after the eager rows;
    the twin keeps the baseline's own reference (the dense FFN computes another function)."""
    cuda = torch.device("cuda")
    fff = next(c for c in cases.CASES if c.kernel == "fff_forward")
    names = [p.name for p in fff.providers(cuda, True, "bfloat16")]
    g = cases.GRAPH_SUFFIX
    assert names.index("tritonlab" + g) > max(i for i, n in enumerate(names) if not n.endswith(g))
    assert {"dense-ffn" + g, "torch-naive" + g} <= set(names)
    assert "torch.compile-naive" + g not in names and cases.OWN_FALLBACK + g not in names
    assert not any(n.endswith(g) for n in (p.name for p in fff.providers(CPU, True, "float32")))
    # no captured row of ours (quantize): no twins either
    quantize = next(c for c in cases.CASES if c.kernel == "quantize")
    assert not any(p.name.endswith(g) for p in quantize.providers(cuda, True, quantize.presets["quick"].dtypes[0]))

    monkeypatch.setattr(cases, "graph_replay", lambda fn: fn)  # no GPU here: the capture itself is not run
    reference = lambda rows: rows  # noqa: E731
    twin = cases.captured(lambda inp, dev: cases.Prepared(lambda: 7, reference=reference, note="width 9"))({}, cuda)
    assert twin.fn() == 7 and twin.reference is reference and twin.note == "width 9"
    with pytest.raises(cases.Unavailable):
        cases.captured(lambda inp, dev: cases.Prepared(lambda: 7))({}, CPU)


def test_rebuild_rewrites_a_report_from_its_files(synthetic_report, tmp_path, capsys):
    """--rebuild recomputes the derived columns and tables from a folder's own measurements: a
    stale speedup in results.csv is replaced, the medians stay, and the README says it was rebuilt."""
    _, folder = synthetic_report
    stale = pd.read_csv(folder / "results.csv")
    stale["speedup"] = 99.0
    copy = tmp_path / "copy"
    copy.mkdir()
    stale.to_csv(copy / "results.csv", index=False)
    for name in ("environment.json", "roofline.json"):
        (copy / name).write_text((folder / name).read_text())
    assert cli_main(["report", "--rebuild", str(copy)]) == 0
    rebuilt = pd.read_csv(copy / "results.csv")
    assert not (rebuilt["speedup"] == 99.0).any()
    pd.testing.assert_series_equal(rebuilt["median_ms"], stale["median_ms"])
    assert "--rebuild" in (copy / "README.md").read_text()
    with pytest.raises(SystemExit) as exit_info:  # not a report folder: a usage error
        cli_main(["report", "--rebuild", str(tmp_path)])
    assert exit_info.value.code == 2


def test_expert_loop_baselines_skip_empty_groups():
    """The loop-over-experts baselines visit only the groups that have slots (as Hugging Face's
    Mixtral loop does: at G = 256, T = 9 most groups are empty) and still compute the op."""
    from tritonlab import baselines
    from tritonlab.kernels.grouped_gemm import reference as gref

    x, w, b = torch.randn(9, 20), torch.randn(256, 20, 12), torch.randn(256, 12)
    idx, rw = torch.randint(0, 256, (9, 2)), torch.rand(9, 2)
    visited = []

    def gms(g, rows):
        visited.append(g)
        return torch.relu(rows @ w[g] + b[g])

    y = baselines.expert_loop(x, idx, gms, 12, rw)
    assert sorted(visited) == sorted(set(idx.flatten().tolist()))
    expected = gref.gather_matmul_scatter_ref(*(t.double().numpy() for t in (x, w)), idx.numpy(), b.double().numpy(),
                                              rw.double().numpy(), "relu")
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(baselines.gms_expert_loop(x, w, idx, b, rw, "relu").double().numpy(), expected,
                               rtol=1e-4, atol=1e-4)
