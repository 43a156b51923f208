"""Edge cases of the tooling found by fuzzing: the tuning database, the search strategies, the
autotune / report / profile / compile-check command lines. Each test failed before its fix.

CPU only and quick: synthetic kernels and synthetic report folders, no measurement.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tritonlab import bench, plots, report, roofline  # noqa: E402
from tritonlab.autotune import database as dbm  # noqa: E402
from tritonlab.autotune import provider, search  # noqa: E402
from tritonlab.autotune.cli import main as autotune_main  # noqa: E402
from tritonlab.autotune.database import TuningDB, TuningFile  # noqa: E402
from tritonlab.cli import main as cli_main  # noqa: E402
from tritonlab.kernels import _tuning  # noqa: E402
from tritonlab.kernels._accuracy import rel_error  # noqa: E402

from test_autotune import _entry as autotune_entry  # noqa: E402
from test_autotune import dirs  # noqa: E402,F401  (the tuning-folder fixture)


def _entry(config, time_ms=1.0, shape=None, **kw):
    return autotune_entry(config, time_ms, shape or {"T": 4, "D": 8}, **kw)


def _write(path: Path, entries: dict, **top) -> None:
    """A database file holding kernel "k", dtype float16, {key: entry}."""
    data = {"format": dbm.FORMAT_VERSION, "slug": path.stem, "kernels": {"k": {"float16": entries}}}
    data.update(top)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- database files


def test_binary_database_file_is_set_aside_not_fatal(dirs):
    """Bytes that are not UTF-8 raised UnicodeDecodeError out of every lookup (a ValueError, not the
    OSError the reader caught): now the file is reported and set aside like any corrupted one."""
    user, _ = dirs
    garbage = b"\xff\xfe\x00{\"kernels\": {}}"
    (user / "gpu_test.json").write_bytes(garbage)
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert TuningDB("gpu_test").lookup("k", {"T": 4, "D": 8}, torch.float16) == (None, "none")
    aside = list(user.glob("gpu_test.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == garbage
    (user / "src.json").write_bytes(garbage)
    with pytest.raises(ValueError, match="cannot merge"):  # a merge source is refused, never set aside
        dbm.merge_files([user / "src.json"], user / "dest.json")
    assert (user / "src.json").read_bytes() == garbage


def test_setting_aside_twice_in_one_second_keeps_both_copies(dirs):
    """The set-aside name was <file>.corrupt-<second>-<pid>: a second corrupted file in the same
    second replaced (destroyed) the first copy while the warning said it was kept."""
    user, _ = dirs
    path = user / "gpu_test.json"
    for text in ("{first", "{second"):
        path.write_text(text)
        with pytest.warns(RuntimeWarning, match="corrupted"):
            TuningFile(path).load()
    kept = sorted(p.read_text() for p in user.glob("gpu_test.json.corrupt-*"))
    assert kept == ["{first", "{second"]


def test_entries_without_a_usable_time_do_not_break_writes_merges_or_show(dirs, tmp_path, capsys):
    """A hand-edited time_ms ("fast") made put(keep="faster") and merge raise TypeError and --show
    crash; a NaN time_ms could never be replaced by a measured winner (NaN compares False)."""
    user, _ = dirs
    path = user / "gpu_test.json"
    _write(path, {"D=8,T=4": dict(_entry({"B": 1}), time_ms="fast", speedup="2x", default_time_ms=[1]),
                  "D=8,T=8": dict(_entry({"B": 1}), time_ms=float("nan"))})
    assert autotune_main(["--show", "--slug", "gpu_test", "--config-dir", str(user)]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "2x" in out
    TuningFile(path).put("k", "float16", "D=8,T=4", _entry({"B": 2}, time_ms=0.5), keep="faster")
    src = tmp_path / "gpu_test.json"
    _write(src, {"D=8,T=8": _entry({"B": 3}, time_ms=0.7)})
    counts = dbm.merge_files([src], path)
    assert counts == {"added": 0, "replaced": 1, "kept": 0}
    got = {key: e["config"] for _, _, key, e in dbm.iter_entries(TuningFile(path).load())}
    assert got == {"D=8,T=4": {"B": 2}, "D=8,T=8": {"B": 3}}
    # the other way round: an entry without a usable time never replaces a measured one
    _write(src, {"D=8,T=8": dict(_entry({"B": 4}), time_ms=float("nan"))})
    assert dbm.merge_files([src], path) == {"added": 0, "replaced": 0, "kept": 1}


def test_a_usable_time_beats_completeness_in_merges(dirs, tmp_path):
    """A complete entry whose time is NaN or text won over a measured partial one ("complete beats
    partial" came first), so a garbled entry still blocked a real measurement."""
    user, _ = dirs
    path = user / "gpu_test.json"
    _write(path, {"D=8,T=4": dict(_entry({"B": 1}), time_ms=float("nan"), complete=True)})
    src = tmp_path / "gpu_test.json"
    _write(src, {"D=8,T=4": dict(_entry({"B": 2}, time_ms=0.9), complete=False)})
    assert dbm.merge_files([src], path) == {"added": 0, "replaced": 1, "kept": 0}
    assert TuningFile(path).load()["kernels"]["k"]["float16"]["D=8,T=4"]["config"] == {"B": 2}


def test_merge_of_files_with_non_string_device_or_slug(dirs, tmp_path, capsys):
    """Valid JSON naming its device or slug by a list raised TypeError (unhashable) in merge_files
    and in `--merge`; now the device is ignored and the slug is a clear error unless --slug names
    the database."""
    user, _ = dirs
    src = tmp_path / "gpu_a.json"
    _write(src, {"D=8,T=4": _entry({"B": 1})}, device=["H100"], slug=["x"])
    dest = user / "gpu_b.json"
    _write(dest, {}, device={"name": 1})
    assert dbm.merge_files([src], dest) == {"added": 1, "replaced": 0, "kept": 0}
    assert autotune_main(["--merge", str(src), "--config-dir", str(user)]) == 2
    assert "not a string" in capsys.readouterr().out
    assert not (user / "gpu_a.json").exists()
    assert autotune_main(["--merge", str(src), "--slug", "gpu_c", "--config-dir", str(user)]) == 0
    assert TuningDB("gpu_c", user_dir=user).get("k", {"T": 4, "D": 8}, "float16")["config"] == {"B": 1}


# ----------------------------------------------------------------------------- TRITONLAB_AUTOTUNE=1


def test_on_the_fly_winner_serves_even_when_it_cannot_be_stored(tmp_path, monkeypatch):
    """With a config folder that cannot be written, TRITONLAB_AUTOTUNE=1 tuned the problem and then
    threw the winner away (the write's exception ran the default), in every new process."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TRITONLAB_CONFIG_DIR", str(blocker / "configs"))  # mkdir there fails
    monkeypatch.setattr(dbm, "shipped_config_dir", lambda: tmp_path / "shipped")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRITONLAB_AUTOTUNE", "1")
    configs = [{"B": 16}, {"B": 32}, {"B": 64}]
    kernel = _tuning.TunableKernel(
        name="fake_unstorable", default=lambda s: {"B": 16}, space=lambda s: [dict(c) for c in configs],
        make_inputs=lambda s, dt, dev: {"x": torch.randn(s["T"], s["D"], dtype=dt, device=dev)},
        run=lambda inp, cfg: inp["x"] * 2,
        error=lambda inp, out: rel_error(out, 2 * inp["x"].double().numpy()), tolerance=lambda dt: 1e-6,
        dtypes=(torch.float32,))
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    from tritonlab.autotune import tuner

    real_tune = tuner.tune
    monkeypatch.setattr(tuner, "tune", lambda *a, **kw: real_tune(*a, **dict(kw, timer=lambda fn, c: 100.0 / c["B"])))
    provider.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = provider.config_provider(kernel.name, {"T": 5, "D": 7}, torch.float32, torch.device("cpu"))
    finally:
        provider.reset()
    assert got == {"B": 64}
    assert any("could not store" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- search strategies


def test_budgeted_measures_a_repeated_config_once():
    """exhaustive dropped duplicates; budgeted measured a config listed twice twice (the budget paid
    for it)."""
    calls = []
    out = search.budgeted([{"A": 1}, {"A": 1}, {"A": 2}], lambda c: calls.append(dict(c)) or float(c["A"]))
    assert sorted(c["A"] for c in calls) == [1, 2] and out == {"A=1": 1.0, "A=2": 2.0}


def test_budgeted_with_a_flag_given_as_bool_and_int():
    """True == 1 collapsed the parameter's values in a set while ranks are by repr: KeyError."""
    configs = [{"A": True}, {"A": False}, {"A": 1}, {"A": 0}]
    out = search.budgeted(configs, lambda c: 1.0 + int(c["A"]), max_measurements=4)
    assert set(out) == {"A=True", "A=False", "A=1", "A=0"}


# ----------------------------------------------------------------------------- report --rebuild and inputs

CEILINGS = roofline.Ceilings(device="cpu", bandwidth_gbs=10.0, peaks_tflops={"fp32": 0.1},
                             details={"bandwidth": "synthetic", "fp32": "synthetic"})
ENV = {"device": "cpu", "commit": "abc123", "date": "2025-01-01 00:00 UTC"}


def _results() -> pd.DataFrame:
    rows = []
    for t in (64, 128):
        for prov, role, ms in (("tritonlab", "ours", 0.01), ("torch", "baseline", 0.03)):
            rows.append({"family": "toy", "kernel": "toy_tanh", "shape": f"T={t} D=7", "series": "D=7",
                         "size_key": "T", "size": t, "dtype": "float32", "provider": prov, "role": role,
                         "status": "ok", "median_ms": ms * t, "p20_ms": 0.9 * ms * t, "p80_ms": 1.1 * ms * t,
                         "flops": 20.0 * t * 7, "bytes": 8.0 * t * 7, "compute": "fp32", "device": "cpu"})
    return bench.to_frame(rows)  # every column of a results.csv


def _folder(path: Path, df: pd.DataFrame, env=None, roof=None) -> Path:
    path.mkdir(parents=True)
    df.to_csv(path / "results.csv", index=False)
    (path / "environment.json").write_text(env if env is not None else json.dumps(ENV))
    (path / "roofline.json").write_text(roof if roof is not None else CEILINGS.to_json())
    return path


def test_rebuild_of_a_csv_with_missing_columns_and_garbled_values(tmp_path, capsys):
    """A results.csv without a measured column (here flops, as in an older report) or with text in a
    numeric column raised KeyError / TypeError; now the rebuild leaves them empty and says so."""
    df = _results().drop(columns=["flops"])
    df["median_ms"] = df["median_ms"].astype(object)
    df.loc[0, "median_ms"] = "fast"
    folder = _folder(tmp_path / "rep", df)
    assert cli_main(["report", "--rebuild", str(folder)]) == 0
    readme = (folder / "README.md").read_text()
    assert "no column(s) flops" in readme and "not numbers in column(s) median_ms" in readme
    back = pd.read_csv(folder / "results.csv")
    assert back["flops"].isna().all() and math.isnan(back.loc[0, "median_ms"])
    assert back.loc[1, "median_ms"] == pytest.approx(0.03 * 64)  # the other measurements stay


@pytest.mark.parametrize("env,roof", [("{", None), ("[1]", None), (None, "{"), (None, "[]"),
                                      (None, '{"device": "cpu"}'), (None, '{"bandwidth_gbs": null}')],
                         ids=["env-garbled", "env-list", "roof-garbled", "roof-list", "roof-no-bandwidth",
                              "roof-null-bandwidth"])
def test_rebuild_with_unreadable_environment_or_ceilings_exits_2(tmp_path, capsys, env, roof):
    folder = _folder(tmp_path / "rep", _results(), env=env, roof=roof)
    assert cli_main(["report", "--rebuild", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "tritonlab report --rebuild" in err and ("environment.json" in err or "roofline.json" in err)
    assert not (folder / "README.md").exists()


def test_ceilings_from_json_ignores_unknown_keys():
    """A key a later tritonlab adds to roofline.json raised TypeError (unexpected keyword)."""
    data = json.loads(CEILINGS.to_json())
    data["measured_with"] = "a later version"
    assert roofline.Ceilings.from_json(json.dumps(data)) == CEILINGS


def test_speedup_plot_of_only_zero_or_infinite_speedups(tmp_path):
    """An infinite median (a hand-edited CSV) gave every bar of a panel a speedup of 0 and the log
    axis raised "Data cannot be log-scaled"; such values are left out of the plots."""
    df = _results()
    df.loc[df["role"] == "ours", "median_ms"] = math.inf
    df = roofline.annotate(bench.finalize(bench.to_frame(df.to_dict("records"))), CEILINGS)
    assert (df.loc[df["role"] == "baseline", "ours_speedup"] == 0).all()
    assert plots.speedup_plot(df, "toy", str(tmp_path / "s.png")) is None
    assert plots.scaling_plot(df, "toy", str(tmp_path / "c.png")) is not None  # the finite baseline times
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("text", [None, "{", "[1]", '{"benchmarks": [{"extra_info": {"kernel": "x"}, "stats": {}}]}'],
                         ids=["missing", "garbled", "list", "no-median"])
def test_report_from_bad_benchmark_json_exits_2(tmp_path, capsys, text):
    path = tmp_path / "bench.json"
    if text is not None:
        path.write_text(text)
    assert cli_main(["report", "--from-benchmark-json", str(path), "--out", str(tmp_path / "out"),
                     "--no-progress"]) == 2
    assert "--from-benchmark-json" in capsys.readouterr().err
    assert not (tmp_path / "out" / "README.md").exists()


@pytest.mark.parametrize("argv", [["report", "--time-limit", "-5"], ["report", "--time-limit", "nan"],
                                  ["profile", "--calls", "0"], ["profile", "--calls", "-3"]])
def test_numeric_options_out_of_range_exit_2(tmp_path, capsys, argv):
    """--time-limit -5 skipped every task (and nan none) yet wrote a report; profile --calls 0 ran
    one call and titled the table "0 calls per measurement". Both are refused before any work."""
    out = tmp_path / ("out.md" if argv[0] == "profile" else "out")
    assert cli_main(argv + ["--kernel", "tree_route", "--out", str(out)]) == 2
    assert argv[1] in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- compile-check --configs tuned


def test_compile_check_tuned_skips_entries_it_cannot_build(dirs, capsys):
    """An entry whose shape lacks dims the kernel needs raised KeyError out of compile-check (a
    traceback); such entries (and unknown dtypes, keys that are no shape) are skipped and named."""
    from tritonlab.autotune.offline import run_check

    user, _ = dirs
    (user / "gpu_cc.json").write_text(json.dumps({"format": 1, "kernels": {"tree_route": {
        "bfloat16": {"T=4": {"config": {"BLOCK_T": 16}, "shape": {"T": 4}},
                     "garbage": {"config": {"BLOCK_T": 16}}},
        "bogus": {"D=48,T=128,depth=4": {"config": {"BLOCK_T": 16}}}}}}))
    with pytest.raises(ValueError, match="holds no entry to check"):
        run_check(["tree_route"], configs="tuned", slug="gpu_cc")
    err = capsys.readouterr().err
    assert err.count("skipped") == 3 and "KeyError" in err and "bogus" in err


# ----------------------------------------------------------------------------- kernel_probe (ncu's program)

def test_kernel_probe_runs_a_registered_kernel_and_checks_it(capsys):
    from tritonlab import kernel_probe

    t = int(torch.randint(1, 40, ()))
    assert kernel_probe.main(["tree_route", f"T={t},D=12,depth=3", "--dtype", "float32", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert f"'T': {t}" in out and "error 0 " in out  # leaves are exact: any wrong one would show here


@pytest.mark.parametrize("argv,what", [
    (["nope", "T=4"], "unknown kernel"),
    (["tree_route", "T=x,D=4"], "shape must look like"),
    (["tree_route", "T=4,D=4,depth=1", "--dtype", "float3000"], "--dtype"),
    (["tree_route", "T=4,D=4,depth=1", "--calls", "0"], "--calls"),
    (["tree_route", "T=10,D=8"], "needs the shape name 'depth'"),  # was a KeyError traceback
])
def test_kernel_probe_bad_arguments_exit_2(argv, what, capsys):
    from tritonlab import kernel_probe

    assert kernel_probe.main(argv) == 2
    assert what in capsys.readouterr().err


def test_kernel_probe_without_a_gpu_or_the_interpreter_says_so(monkeypatch, capsys):
    """It used to end in Triton's "0 active drivers" traceback."""
    from tritonlab import kernel_probe

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert kernel_probe.main(["tree_route", "T=4,D=4,depth=1"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
