"""`tritonlab report`: benchmark every kernel family on this machine and regenerate its report.

    tritonlab report                          # all families, the device's default preset, reports/<device>/
    tritonlab report --quick --out /tmp/q     # small CPU shapes, under two minutes (not over the full report)
    tritonlab report --kernel tree_routing --kernel quantize --out /tmp/r
    tritonlab report --compare reports/A reports/B   # change between two reports, exit 1 on a regression
    tritonlab report --from-benchmark-json bench.json  # a report from pytest-benchmark's JSON

The report folder (reports/<device-slug>/ on a GPU, reports/cpu-<cpu model>/ on a CPU) holds
README.md (tables, plots inline), results.csv (one tidy row per kernel x shape x dtype x provider),
the PNG plots, roofline.json (the measured ceilings) and environment.json. Nothing in it is edited
by hand: the command rewrites it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
import torch

from . import bench, cases, plots, roofline
from .autotune import device_slug, slugify
from .autotune.database import output_dir_argument

#: a median this much slower (B / A - 1) is a regression in --compare
DEFAULT_THRESHOLD = 0.10
COMPARE_KEYS = ["family", "kernel", "shape", "dtype", "provider"]
#: --quick's default --time-limit (the whole quick run stays under two minutes)
QUICK_TIME_LIMIT_S = 90.0
#: rows measured so far, rewritten after every task of a run (removed when the report is written)
PARTIAL_CSV = "results.partial.csv"
#: results.csv columns computed from the others (finalize, roofline.annotate): --rebuild recomputes them
DERIVED_COLUMNS = ("tflops", "gbps", "roofline_ms", "roofline_frac", "bound", "primary_baseline", "speedup",
                   "ours_speedup")


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", "-k", action="extend", nargs="+", default=None, metavar="K",
                        help="only these families or ops (e.g. tree_routing, fff_forward, quantize); repeatable")
    parser.add_argument("--quick", action="store_true", help="the small 'quick' preset (a CPU run in under 2 minutes)")
    parser.add_argument("--preset", choices=cases.PRESETS, default=None,
                        help="shape preset (default: 'models' on a GPU, 'cpu' on a CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to measure")
    parser.add_argument("--out", default=None, type=output_dir_argument,
                        help="report folder (default reports/<GPU slug>/, or reports/cpu-<CPU model>/ on a CPU: "
                             "tuning files name every CPU 'cpu', reports name the model)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                        help="compare two reports (folders or results.csv): B against A; exit 1 on a regression")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="--compare: a median slower by more than this fraction is a regression (default 0.10)")
    parser.add_argument("--all-providers", action="store_true",
                        help="--compare: flag slower baselines too (default: only tritonlab's own rows)")
    parser.add_argument("--rebuild", default=None, metavar="FOLDER", type=_report_folder,
                        help="write FOLDER's report again from its results.csv, environment.json and roofline.json "
                             "(the same measurements; derived columns, tables and plots recomputed), into --out "
                             "or FOLDER itself")
    parser.add_argument("--from-benchmark-json", default=None, metavar="FILE",
                        help="build the report from pytest-benchmark JSON (tests/bench_cpu.py) instead of measuring")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include torch.compile baselines (default: on a GPU only; on a CPU compiling costs minutes)")
    parser.add_argument("--seed", type=int, default=None, help="input seed (default: fresh per task, recorded)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="skip the tasks not started after this many seconds (noted in the report), so that "
                             "a run under an outer time limit still writes its report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--replace", action="store_true",
                        help="let a run of another preset replace the report in the output folder (without it, "
                             "e.g. a --quick run refuses to overwrite the full report in the default folder)")


def _report_folder(value: str) -> str:
    """argparse `type` for --rebuild: a folder holding a report's results.csv, environment.json, roofline.json."""
    missing = [n for n in ("results.csv", "environment.json", "roofline.json") if not (Path(value) / n).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(f"{value!r} is not a report folder (missing {', '.join(missing)})")
    return value


def rebuild(folder: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None) -> Path:
    """The report of `folder` written again from its own files (no measurement): speedups, primary
    baselines, FLOP/byte counts (for shapes the cases still define), roofline shares, tables and
    plots follow the current rules. The command line in the README says so."""
    folder = Path(folder)
    try:
        env = json.loads((folder / "environment.json").read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{folder / 'environment.json'} is not JSON ({e})") from None
    if not isinstance(env, dict):
        raise ValueError(f"{folder / 'environment.json'} is not a JSON object")
    try:
        ceil = roofline.Ceilings.from_json((folder / "roofline.json").read_text())
    except ValueError as e:
        raise ValueError(f"{folder / 'roofline.json'}: {e}") from None
    raw = load_results(folder / "results.csv")
    notes = []
    # a results.csv of an older tritonlab (or edited by hand): the derived columns are recomputed
    # anyway; a missing measured one is left empty and said so, a non-number in a numeric one too
    missing = [c for c in bench.RESULT_COLUMNS if c not in raw.columns and c not in DERIVED_COLUMNS]
    if missing:
        notes.append(f"results.csv has no column(s) {', '.join(missing)}: left empty in this rebuild")
    df = bench.to_frame(raw.to_dict("records"))
    garbled = [c for c in bench.NUMERIC_COLUMNS if c in raw.columns and c not in DERIVED_COLUMNS
               and int(raw[c].notna().sum()) != int(df[c].notna().sum())]
    if garbled:
        notes.append(f"results.csv has values that are not numbers in column(s) {', '.join(garbled)}: left empty")
    recounted = recount(df)
    if recounted:
        notes.append(f"FLOPs and bytes of {', '.join(recounted)} recounted with the current counting rules (stated "
                     "per kernel below); results.csv held the counts of the tritonlab that measured them. The "
                     "times are the measured ones")
    df = roofline.annotate(bench.finalize(df), ceil)
    families = list(dict.fromkeys(df["family"]))
    kernels = set(df["kernel"])
    commit = env.get("commit", "?")
    return write_report(df, ceil, Path(out_dir) if out_dir else folder, notes=notes,
                        source=f"measurements of {env.get('date', '?')} at commit {commit}, tables rebuilt",
                        command=f"tritonlab report --rebuild {folder.as_posix()}", env=env, families=families,
                        selected=[c for c in cases.CASES if c.kernel in kernels])


def recount(df: pd.DataFrame) -> list[str]:
    """Set each row's flops, bytes and compute (in place) to its case's current counts, where the
    case still defines that shape: the report states the current counting rules per kernel, so the
    TFLOP/s, GB/s and roofline columns must use them too (a rule changed since the measurement, as
    fnet_mix's FLOPs did, would otherwise be stated one way and applied another). Returns the
    kernels whose counts changed."""
    known: dict[tuple, tuple] = {}
    for c in cases.CASES:
        for sweep in c.presets.values():
            for s in sweep.shapes:
                known.setdefault((c.family, c.kernel, cases.shape_label(s)), (c, s))
    changed = []
    for i in df.index:
        hit = known.get((df.at[i, "family"], df.at[i, "kernel"], df.at[i, "shape"]))
        if hit is None:
            continue
        case, shape = hit
        dtype = df.at[i, "dtype"]
        try:
            flops, n_bytes, compute = float(case.flops(shape)), float(case.bytes(shape, dtype)), case.compute(dtype)
        except Exception:  # a dtype the case no longer knows: keep the stored counts
            continue
        same = (math.isclose(flops, df.at[i, "flops"], rel_tol=1e-9)
                and math.isclose(n_bytes, df.at[i, "bytes"], rel_tol=1e-9) and compute == df.at[i, "compute"])
        if not same:
            df.at[i, "flops"], df.at[i, "bytes"], df.at[i, "compute"] = flops, n_bytes, compute
            changed.append(str(df.at[i, "kernel"]))
    return list(dict.fromkeys(changed))


def mixed_timer_note(df: pd.DataFrame) -> Optional[str]:
    """A note naming the rows timed by another timer than the rows they are compared with (same
    kernel, shape and dtype, both eager or both captured): e.g. rows of an older tritonlab that timed
    short calls as CUDA graphs without an L2 flush under an eager name. Their speedups mix timers."""
    captured = df["provider"].astype(str).str.endswith(cases.GRAPH_SUFFIX)
    timed = df[(df["status"] == "ok") & df["median_ms"].notna() & (df["timer"].astype(str) != "")]
    timed = timed.assign(_captured=captured[timed.index])
    items = []
    keys = ["family", "kernel", "shape", "dtype", "_captured"]
    for (_, kernel, shape, dtype, _), g in timed.groupby(keys, sort=False):
        if g["timer"].nunique() < 2:
            continue
        by_timer = {t: ", ".join(g.loc[g["timer"] == t, "provider"]) for t in dict.fromkeys(g["timer"])}
        items.append(f"{kernel} {shape} {dtype}: " + " against ".join(f"{p} by {t}" for t, p in by_timer.items()))
    if not items:
        return None
    return ("rows compared with each other were timed differently (results.csv `timer`), so their speedups mix "
            "two timers: " + "; ".join(items))


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return run_compare(args.compare[0], args.compare[1], args.threshold, args.all_providers)
    if args.rebuild:
        try:
            out = rebuild(args.rebuild, args.out)
        except (OSError, ValueError) as e:
            print(f"tritonlab report --rebuild: {e}", file=sys.stderr)
            return 2
        print(f"tritonlab report: rebuilt {out / 'README.md'} from {args.rebuild}")
        return 0
    if args.time_limit is not None and not args.time_limit >= 0:  # NaN fails too
        print(f"tritonlab report: --time-limit must be a number of seconds >= 0, got {args.time_limit}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    preset = "quick" if args.quick else (args.preset or ("models" if device.type == "cuda" else "cpu"))
    out_dir = Path(args.out) if args.out else default_out_dir(device)
    try:
        selected = cases.select(args.kernel)
    except ValueError as e:
        print(f"tritonlab report: {e}", file=sys.stderr)
        return 2
    json_rows = None
    if args.from_benchmark_json:  # read first: its rows name the preset they were measured at
        try:
            json_rows, json_notes, json_preset = rows_from_benchmark_json(args.from_benchmark_json, args.kernel)
        except (OSError, ValueError) as e:
            print(f"tritonlab report --from-benchmark-json: {e}", file=sys.stderr)
            return 2
        preset = json_preset or preset
    existing = _report_preset(out_dir)
    if existing is not None and existing != preset and not args.replace:
        # a report holds one preset's shapes; writing another's would drop every row of the old one
        print(f"tritonlab report: {out_dir} holds a report of preset {existing!r}, which this {preset!r} run would "
              f"replace{' (its other kernels too)' if args.kernel else ''}; pass --out DIR to write elsewhere, "
              f"or --replace", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    notes: list[str] = []
    if json_rows is not None:
        rows = json_rows
        notes += json_notes
        source = f"pytest-benchmark JSON {os.path.basename(args.from_benchmark_json)}"
    else:
        opts = bench.preset_options(preset, device, args.compile)
        opts.seed = args.seed
        # quick is a smoke run that must stay short on a busy 2-core machine: tasks not started within
        # QUICK_TIME_LIMIT_S are skipped (and listed) rather than stretching it
        opts.time_limit_s = args.time_limit if args.time_limit is not None else (
            QUICK_TIME_LIMIT_S if preset == "quick" else None)
        tasks, skipped_rows, plan_notes = bench.plan(selected, preset, device)
        notes += plan_notes
        measured = _run_with_progress(tasks, opts, not args.no_progress, checkpoint=out_dir / PARTIAL_CSV)
        rows = bench.order_rows(list(skipped_rows) + measured, selected)
        source = f"preset {preset!r}" + (", torch.compile baselines" if opts.compile_baselines else "")
    if args.kernel:  # a partial run updates its kernels in the report and keeps the others
        kept, note = _kept_rows(out_dir, selected, preset)
        if kept:
            rows = bench.order_rows(kept + rows, cases.CASES)
            notes.append(note)
            selected = [c for c in cases.CASES if (c.family, c.kernel) in {(r["family"], r["kernel"]) for r in rows}]
    df = bench.finalize(bench.to_frame(rows))
    needed = {c for c in df["compute"].dropna().unique()} | {"fp32"}
    ceil = roofline.measure(device, needed, quick=preset == "quick")
    df = roofline.annotate(df, ceil)
    command = _command_line(args)
    write_report(df, ceil, out_dir, notes=notes, source=source, command=command, elapsed_s=time.perf_counter() - t0,
                 families=list(dict.fromkeys(c.family for c in selected)), selected=selected,
                 extra_env={"preset": preset})
    _print_summary(df, out_dir, time.perf_counter() - t0)
    return 0


def _report_preset(out_dir: Path) -> Optional[str]:
    """The preset of the report in out_dir, or None when the folder holds no report or its
    environment.json names no preset."""
    try:
        env = json.loads((out_dir / "environment.json").read_text())
    except (OSError, ValueError):
        return None
    preset = env.get("preset") if isinstance(env, dict) else None
    return str(preset) if preset else None


def _kept_rows(out_dir: Path, selected: list[cases.Case], preset: str) -> tuple[list[dict], str]:
    """Rows of the kernels not re-measured, from the report already in out_dir (same preset only)."""
    try:
        old = load_results(out_dir)
        old_env = json.loads((out_dir / "environment.json").read_text())
    except (OSError, ValueError):
        return [], ""
    if old_env.get("preset") != preset:
        return [], ""
    measured = {(c.family, c.kernel) for c in selected}
    keep = old[[(f, k) not in measured for f, k in zip(old["family"], old["kernel"])]]
    if keep.empty:
        return [], ""
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in keep.to_dict("records")]
    kernels = ", ".join(dict.fromkeys(keep["kernel"]))
    return rows, (f"rows of {kernels} kept from the previous report in this folder ({old_env.get('date', '?')}, "
                  f"commit {old_env.get('commit', '?')}); only the selected kernels were re-measured")


def _command_line(args: argparse.Namespace) -> str:
    """The command that regenerates this report (from the parsed options)."""
    parts = ["tritonlab", "report"]
    for k in args.kernel or []:
        parts += ["--kernel", k]
    if args.quick:
        parts.append("--quick")
    elif args.preset:
        parts += ["--preset", args.preset]
    if args.device != "auto":
        parts += ["--device", args.device]
    if args.out:
        parts += ["--out", args.out]
    if args.from_benchmark_json:
        parts += ["--from-benchmark-json", args.from_benchmark_json]
    if args.compile is not None:
        parts.append("--compile" if args.compile else "--no-compile")
    if args.seed is not None:
        parts += ["--seed", str(args.seed)]
    if args.time_limit is not None:
        parts += ["--time-limit", f"{args.time_limit:g}"]
    return " ".join(shlex.quote(p) for p in parts)


def resolve_device(name: str) -> torch.device:
    """--device auto | cpu | cuda -> the device to measure on ("auto": the GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tritonlab: --device cuda but no CUDA device is visible")
    return torch.device(name)


def _run_with_progress(tasks: list[bench.Task], opts: bench.BenchOptions, show: bool,
                       checkpoint: Optional[Path] = None) -> list[dict]:
    """bench.run with a rich progress bar; the rows so far are saved to `checkpoint` after each task
    (a run killed from outside leaves them; write_report removes the file)."""
    done: list[dict] = []

    def save(task, rows):
        done.extend(rows)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            bench.to_frame(done).to_csv(checkpoint, index=False)

    if not show or not tasks:
        return bench.run(tasks, opts, on_done=save)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]report[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=Console(stderr=True)) as progress:
        bar = progress.add_task("", total=len(tasks))

        def on_done(task, rows):
            save(task, rows)
            progress.advance(bar)

        return bench.run(tasks, opts, on_start=lambda t: progress.update(bar, description=t.label), on_done=on_done)


def _print_summary(df: pd.DataFrame, out_dir: Path, elapsed: float) -> None:
    counts = df["status"].value_counts().to_dict()
    print(f"tritonlab report: {len(df)} rows ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) "
          f"in {elapsed:.0f} s -> {out_dir}/README.md")
    for _, r in df[(df["role"] == "ours") & (df["status"] == "wrong")].iterrows():
        print(f"  WRONG: {r['kernel']} {r['shape']} {r['dtype']}: {r['note']}", file=sys.stderr)


# ----------------------------------------------------------------------------- where


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo "model name", else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def report_slug(device: torch.device) -> str:
    """reports/ folder name: the GPU's slug, or cpu-<cpu model slug>."""
    if device.type == "cuda":
        return device_slug(device)
    return "cpu-" + slugify(cpu_model())


def default_out_dir(device: torch.device) -> Path:
    """reports/<slug>/ in the repository this package is installed from (editable), else under the cwd."""
    root = Path(__file__).resolve().parent.parent
    base = root if (root / "pyproject.toml").exists() and (root / "lab").is_dir() else Path.cwd()
    return base / "reports" / report_slug(device)


# ----------------------------------------------------------------------------- writing


def _fmt(v: Any, kind: str = "g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if kind == "ms":
        return f"{v:.4g}"
    if kind == "x":
        return f"{v:.3g}x"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "e":
        return f"{v:.1e}"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _time_cell(r) -> str:
    if r["median_ms"] != r["median_ms"] or r["median_ms"] is None:
        return ""
    return f"{_fmt(r['median_ms'], 'ms')} [{_fmt(r['p20_ms'], 'ms')}, {_fmt(r['p80_ms'], 'ms')}]"


def results_table(df: pd.DataFrame) -> str:
    """Every row of a family: one line per kernel x shape x dtype x provider."""
    header = ["kernel", "shape", "dtype", "provider", "status", "median ms [p20, p80]", "TFLOP/s", "GB/s",
              "roofline", "speedup vs primary", "rel err", "note"]
    body = []
    for _, r in df.iterrows():
        status = r["status"] if r["role"] != "ours" else f"**{r['status']}**"
        prov = r["provider"] if r["role"] != "ours" else f"**{r['provider']}**"
        primary = f" ({r['primary_baseline']})" if r["role"] == "ours" and r["primary_baseline"] else ""
        body.append([r["kernel"], r["shape"], r["dtype"], prov, status, _time_cell(r), _fmt(r["tflops"]),
                     _fmt(r["gbps"]), _fmt(r["roofline_frac"], "pct"), _fmt(r["speedup"], "x") + primary,
                     _fmt(r["rel_err"], "e"), r["note"]])
    return _md_table(header, body)


def summary_table(df: pd.DataFrame) -> str:
    """One line per kernel x shape x dtype: our time, the primary baseline's, the speedup, the
    fastest external baseline when it is another one (and our speedup over it), the roofline share;
    where calls were also captured in CUDA graphs (GPU), our captured time and its speedup over the
    first captured baseline."""
    captured = df["provider"].astype(str).str.endswith(cases.GRAPH_SUFFIX)
    header = ["family", "kernel", "shape", "dtype", "tritonlab ms", "primary baseline", "baseline ms", "speedup",
              "fastest other baseline", "roofline", "status"]
    if captured.any():
        header.insert(-2, "in CUDA graphs")
    body = []
    for _, g in df.groupby(["family", "kernel", "shape", "dtype"], sort=False):
        eager, graphs = g[~captured[g.index]], g[captured[g.index]]
        ours = eager[eager["role"] == "ours"]
        if ours.empty:
            continue
        o = ours.iloc[0]
        prim = eager[(eager["provider"] == o["primary_baseline"]) & (eager["role"] == "baseline")]
        base_ms = prim["median_ms"].iloc[0] if len(prim) else math.nan
        external = eager[(eager["role"] == "baseline") & (eager["status"] == "ok") & eager["median_ms"].notna()
                         & (eager["provider"] != cases.OWN_FALLBACK)]
        fastest = ""
        if len(external) and o["status"] == "ok":
            best = external.loc[external["median_ms"].idxmin()]
            if best["provider"] != o["primary_baseline"]:
                fastest = f"{best['provider']} {_fmt(best['median_ms'], 'ms')} ms: {_fmt(best['median_ms'] / o['median_ms'], 'x')}"
        row = [o["family"], o["kernel"], o["shape"], o["dtype"], _fmt(o["median_ms"], "ms"),
               o["primary_baseline"], _fmt(base_ms, "ms"), _fmt(o["speedup"], "x"), fastest,
               _fmt(o["roofline_frac"], "pct"), o["status"]]
        if captured.any():
            row.insert(-2, _captured_cell(graphs))
        body.append(row)
    return _md_table(header, body)


def _captured_cell(graphs: pd.DataFrame) -> str:
    """'0.065 ms: 5.9x dense-ffn-cudagraph' (ours captured against the first captured baseline)."""
    ours = graphs[(graphs["role"] == "ours") & (graphs["status"] == "ok") & graphs["median_ms"].notna()]
    if ours.empty:
        return ""
    o = ours.iloc[0]
    cell = f"{_fmt(o['median_ms'], 'ms')} ms"
    return cell + (f": {_fmt(o['speedup'], 'x')} {o['primary_baseline']}" if o["primary_baseline"] else "")


def headline(df: pd.DataFrame) -> Optional[str]:
    """The CPU tree-routing headline (fff_forward T=4096 D=768 depth 8 H=16 float32 vs the dense FFN
    of width 4096), or on a GPU the same layer at T=16384 bf16, when measured; on a GPU also both
    captured in CUDA graphs. The CPU timer interleaves the providers; the CUDA one times them one
    after the other (bench)."""
    for shape, dtype, timing in (("T=4096 D=768 depth=8 H=16", "float32", "in one run, pairs interleaved"),
                                 ("T=16384 D=768 depth=8 H=16", "bfloat16", "in one run, one after the other")):
        g = df[(df["kernel"] == "fff_forward") & (df["shape"] == shape) & (df["dtype"] == dtype)]
        ok = g[g["status"] == "ok"]
        ours, dense, ours_g, dense_g = (ok[ok["provider"] == p] for p in (
            "tritonlab", "dense-ffn", "tritonlab" + cases.GRAPH_SUFFIX, "dense-ffn" + cases.GRAPH_SUFFIX))
        if len(ours) and len(dense):
            o, d = ours.iloc[0], dense.iloc[0]
            line = (f"**fff_forward {shape} {dtype}: {_fmt(o['median_ms'], 'ms')} ms against "
                    f"{_fmt(d['median_ms'], 'ms')} ms for the dense FFN of equal width "
                    f"(2**depth * H = {2**8 * 16}): {d['median_ms'] / o['median_ms']:.3g}x faster**, "
                    f"{timing}.")
            if len(ours_g) and len(dense_g):
                og, dg = ours_g.iloc[0]["median_ms"], dense_g.iloc[0]["median_ms"]
                line += (f" Both captured in CUDA graphs (no host launch overhead): {_fmt(og, 'ms')} ms against "
                         f"{_fmt(dg, 'ms')} ms, {dg / og:.3g}x.")
            return line
    return None


def write_report(df: pd.DataFrame, ceil: roofline.Ceilings, out_dir: Path, *, notes: Optional[list[str]] = None,
                 source: str = "", command: str = "tritonlab report", elapsed_s: Optional[float] = None,
                 families: Optional[list[str]] = None, selected: Optional[list[cases.Case]] = None,
                 env: Optional[dict] = None, extra_env: Optional[dict] = None) -> Path:
    """Write README.md, results.csv, the plots, roofline.json and environment.json into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if env is None:
        from .env import environment

        env = environment()
        if env.get("device") == "cpu":
            env["cpu_model"] = cpu_model()
    env.update(extra_env or {})
    notes = list(notes or [])
    mixed = mixed_timer_note(df)
    if mixed:
        notes.append(mixed)
    families = families or list(dict.fromkeys(df["family"]))
    df = df[bench.RESULT_COLUMNS]
    df.to_csv(out_dir / "results.csv", index=False)
    (out_dir / "roofline.json").write_text(ceil.to_json() + "\n")
    (out_dir / "environment.json").write_text(json.dumps(env, indent=2, default=str) + "\n")
    for stale in list(out_dir.glob("*.png")) + [out_dir / PARTIAL_CSV]:  # nothing of an older run lingers
        if stale.exists():
            stale.unlink()

    lines = [f"# tritonlab report: {env.get('device', '?')}" + (f" ({env['cpu_model']})" if env.get("cpu_model") else ""),
             "",
             f"Generated by `{command}` ({source}) on {env.get('date', '')}"
             + (f" in {elapsed_s:.0f} s" if elapsed_s is not None else "")
             + ". Do not edit: rerun the command to regenerate.", ""]
    head = headline(df)
    if head:
        lines += ["## Headline", "", head, ""]
    lines += ["## Environment", "", _md_table(["", ""], [[k, _fmt(v)] for k, v in env.items()]), ""]
    lines += ["## Machine ceilings (measured for this report)", "",
              _md_table(["ceiling", "value", "measured with"],
                        [["copy bandwidth", f"{ceil.bandwidth_gbs:.4g} GB/s", ceil.details.get("bandwidth", "")]]
                        + [[k, f"{v:.4g} TFLOP/s", ceil.details.get(k, "")] for k, v in ceil.peaks_tflops.items()]
                        + [[k, "", v] for k, v in ceil.details.items() if k != "bandwidth" and k not in ceil.peaks_tflops]),
              "", "![roofline](roofline.png)" if _plot_roofline(df, ceil, out_dir) else "", ""]
    lines += ["## Summary: tritonlab against its primary baseline", "",
              "Speedup = primary baseline median / tritonlab median (> 1: tritonlab is faster). The primary "
              "baseline is the first in the case's order that ran (the comparison its issue names), other than our own torch "
              f"fallback ({cases.OWN_FALLBACK}) unless it is the only one; when "
              "another baseline was faster, the next column gives it and our speedup over it. Roofline = "
              "max(FLOPs / peak, bytes / bandwidth) / median, from the counts stated per kernel below.", "",
              summary_table(df), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    by_kernel = {c.kernel: c for c in (selected or cases.CASES)}
    for fam in families:
        sub = df[df["family"] == fam]
        if sub.empty:
            continue
        lines += [f"## {fam}", ""]
        for kernel in dict.fromkeys(sub["kernel"]):
            case = by_kernel.get(kernel)
            if case is not None and case.counting:
                lines.append(f"- `{kernel}`: {case.counting}")
        lines += ["", results_table(sub), ""]
        sp = plots.speedup_plot(df, fam, str(out_dir / f"speedup_{fam}.png"))
        if sp:
            lines += [f"![speedup {fam}](speedup_{fam}.png)", ""]
        sc = plots.scaling_plot(df, fam, str(out_dir / f"scaling_{fam}.png"))
        if sc:
            lines += [f"![scaling {fam}](scaling_{fam}.png)", ""]
    lines += ["## How this was measured", "",
              "- Every provider's result is checked against the float64 NumPy reference of the family "
              f"(on up to {cases.CHECK_ROWS} random rows) before it is timed; a result over the tolerance is "
              "reported `wrong` and never timed, one that raises is `failed`, one that cannot run here is `skipped`.",
              "- CUDA: `triton.testing.do_bench` for every row (L2 flushed before each call; median, p20, p80). "
              f"Rows named `...{cases.GRAPH_SUFFIX}` time the same call captured in a CUDA graph and replayed "
              "(no host launch overhead), the same way, and are compared only with each other. CPU: warm-up, then "
              "repetitions with the providers interleaved (A B C, C B A, ...) so that drift cancels.",
              "- `results.csv` columns: " + ", ".join(f"`{c}`" for c in bench.RESULT_COLUMNS) + ".",
              "- `tritonlab report --compare A B` shows the change between two reports and flags regressions.", ""]
    (out_dir / "README.md").write_text("\n".join(lines))
    return out_dir


def _plot_roofline(df: pd.DataFrame, ceil: roofline.Ceilings, out_dir: Path) -> bool:
    ok = df[(df["status"] == "ok") & df["tflops"].notna()]
    if ok.empty:
        return False
    roofline.plot(df, ceil, str(out_dir / "roofline.png"))
    return True


# ----------------------------------------------------------------------------- compare


def load_results(path: str | os.PathLike) -> pd.DataFrame:
    """results.csv of a report folder (or the CSV itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.csv"
    if not p.exists():
        raise FileNotFoundError(f"no results.csv at {path}")
    try:
        df = pd.read_csv(p, keep_default_na=True)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise ValueError(f"{p} is not a results CSV ({type(e).__name__}: {e})") from None
    missing = [c for c in COMPARE_KEYS + ["role", "status", "median_ms"] if c not in df.columns]
    if missing:
        raise ValueError(f"{p} is not a results CSV: columns {missing} are missing")
    return df


def compare(a: pd.DataFrame, b: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD,
            all_providers: bool = False) -> pd.DataFrame:
    """Rows present in both, with change = B median / A median - 1 and a `regression` flag:
    slower by more than `threshold`, or ok in A and wrong/failed in B (tritonlab's rows; every
    provider's with all_providers). A key listed twice in one file (results concatenated by hand)
    counts once, its last row: the later measurement."""
    cols = COMPARE_KEYS + ["role", "status", "median_ms"]
    a, b = (t.drop_duplicates(COMPARE_KEYS, keep="last") for t in (a, b))
    m = a[cols].merge(b[cols], on=COMPARE_KEYS, suffixes=("_a", "_b"), how="inner")
    m["change"] = m["median_ms_b"] / m["median_ms_a"] - 1.0
    watched = (m["role_b"] == "ours") | bool(all_providers)
    slower = (m["status_a"] == "ok") & (m["status_b"] == "ok") & (m["change"] > threshold)
    broke = (m["status_a"] == "ok") & m["status_b"].isin(["wrong", "failed"])
    m["regression"] = watched & (slower | broke)
    m["why"] = ""
    m.loc[m["regression"] & slower, "why"] = "slower"
    m.loc[m["regression"] & broke, "why"] = "now " + m["status_b"].astype(str)
    return m


def run_compare(path_a: str, path_b: str, threshold: float = DEFAULT_THRESHOLD, all_providers: bool = False) -> int:
    """Exit status: 0 no regression, 1 regressions, 2 the comparison could not be made (a missing or
    unreadable CSV, a threshold that is not a number >= 0, no row in common)."""
    try:
        if not threshold >= 0:  # NaN fails too
            raise ValueError(f"--threshold must be a number >= 0, got {threshold}")
        a, b = load_results(path_a), load_results(path_b)
    except (FileNotFoundError, ValueError) as e:
        print(f"tritonlab report --compare: {e}", file=sys.stderr)
        return 2
    m = compare(a, b, threshold, all_providers)
    if m.empty:
        print(f"tritonlab report --compare: {path_a} and {path_b} have no row in common", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{path_b} against {path_a} (regression: > {threshold:.0%} slower)")
    for c in ("kernel", "shape", "dtype", "provider", "A ms", "B ms", "change", ""):
        table.add_column(c)
    for _, r in m.iterrows():
        change = "" if r["change"] != r["change"] else f"{r['change']:+.1%}"
        flag = f"[bold red]REGRESSION ({r['why']})[/]" if r["regression"] else ""
        style = None if r["role_b"] == "ours" else "dim"
        table.add_row(r["kernel"], r["shape"], r["dtype"], r["provider"], _fmt(r["median_ms_a"], "ms"),
                      _fmt(r["median_ms_b"], "ms"), change, flag, style=style)
    console = Console()
    console.print(table)
    for _, r in m[m["regression"]].iterrows():  # plain lines too: a narrow CI log truncates the table
        change = "" if r["change"] != r["change"] else f" {r['change']:+.1%}"
        print(f"REGRESSION ({r['why']}{change}): {r['kernel']} {r['shape']} {r['dtype']} {r['provider']}")
    only_a, only_b = (len(t.drop_duplicates(COMPARE_KEYS)) - len(m) for t in (a, b))
    n_reg = int(m["regression"].sum())
    console.print(f"{len(m)} rows compared, {only_a} only in A, {only_b} only in B; "
                  f"{n_reg} regression{'s' if n_reg != 1 else ''}")
    return 1 if n_reg else 0


# ----------------------------------------------------------------------------- pytest-benchmark


def rows_from_benchmark_json(path: str, kernels: Optional[list[str]] = None
                             ) -> tuple[list[dict], list[str], Optional[str]]:
    """Result rows from pytest-benchmark's JSON (tests/bench_cpu.py puts each row's metadata in
    extra_info), notes, and the shape preset the rows name (None when they name none, or several).
    p20/p80 come from the raw samples when the JSON has them (--benchmark-save-data), else from the
    quartiles."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks", []), list):
        raise ValueError(f"{path} is not pytest-benchmark JSON (no list of benchmarks)")
    rows, notes, quartiles, presets = [], [], False, set()
    for bm in data.get("benchmarks", []):
        if not isinstance(bm, dict) or not isinstance(bm.get("extra_info") or {}, dict):
            raise ValueError(f"{path}: a benchmark that is not a pytest-benchmark record: {str(bm)[:80]}")
        info = dict(bm.get("extra_info") or {})
        if "kernel" not in info:
            continue
        if kernels and info.get("family") not in kernels and info.get("kernel") not in kernels:
            continue
        stats = bm.get("stats") or {}
        if not isinstance(stats, dict) or not (stats.get("data") or "median" in stats):
            raise ValueError(f"{path}: benchmark {bm.get('name', '?')!r} has no timings (stats.median or stats.data)")
        raw = stats.get("data")
        if raw:
            med, p20, p80 = bench._quantiles([1e3 * v for v in raw])
        else:
            quartiles = True
            med, p20, p80 = 1e3 * stats["median"], 1e3 * stats.get("q1", math.nan), 1e3 * stats.get("q3", math.nan)
        presets.add(info.get("preset"))
        row = {c: info.get(c) for c in bench.RESULT_COLUMNS}
        row.update(median_ms=med, p20_ms=p20, p80_ms=p80, reps=stats.get("rounds"), timer="pytest-benchmark",
                   status=info.get("status", "ok"), note=info.get("note") or "")
        rows.append(row)
    when = data.get("datetime", "")
    notes.append(f"timings from pytest-benchmark ({os.path.basename(path)}, {when}): each provider timed on its "
                 "own, not interleaved")
    if quartiles:
        notes.append("the JSON has no raw samples (run with --benchmark-save-data): p20/p80 hold the quartiles")
    named = presets.pop() if len(presets) == 1 else None
    return rows, notes, named if isinstance(named, str) and named else None


def main(argv: Optional[list[str]] = None) -> int:  # `python -m tritonlab.report`
    parser = argparse.ArgumentParser(prog="tritonlab report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
