"""`tritonlab autotune`: tune the registered kernels for this GPU and write its tuning database.

    tritonlab autotune [--kernel K ...] [--preset small|models|full] [--dtype D ...]
                       [--strategy exhaustive|budgeted] [--budget MIN] [--max-measurements N]
                       [--workers N | --ray ADDRESS] [--retune] [--config-dir DIR] [--import MODULE]
    tritonlab autotune --show [--slug SLUG]
    tritonlab autotune --merge FILE [FILE ...]
    tritonlab autotune --vs-triton-autotune [--kernel K ...] [--preset P] [--strategy S] [--budget MIN]
                       [--rounds N] [--out FILE.md|.csv|.json]

Entries are written one by one as jobs finish (an interrupted run keeps them; running again tunes
only what is missing). `--budget` bounds the whole run in minutes and selects the budgeted strategy
unless --strategy says otherwise; each job gets at most twice its fair share of the budget.
`--vs-triton-autotune` compares our pick with Triton's own autotuner over the same space, side by
side (versus.py); there `--budget` only stops new jobs from starting.
lab/cli.py wires this module in through `add_arguments(parser)` and `run(args)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Optional

PRESETS = ("small", "models", "full")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .database import output_file_argument, slug_argument

    p.add_argument("--kernel", "-k", nargs="+", action="extend", metavar="K",
                   help="kernels to tune (registered names; default: all)")
    p.add_argument("--preset", choices=PRESETS, default="models",
                   help="shape preset: small (interpreter-sized), models (the speed targets), full")
    p.add_argument("--dtype", nargs="+", action="extend", metavar="D",
                   help="dtypes to tune (bfloat16, float16, float32, ...; default: each kernel's own)")
    p.add_argument("--strategy", choices=("exhaustive", "budgeted"), default=None,
                   help="search strategy (default: exhaustive, or budgeted when --budget is given)")
    p.add_argument("--budget", type=float, default=None, metavar="MIN",
                   help="wall-clock budget for the whole run, in minutes")
    p.add_argument("--max-measurements", type=int, default=None, metavar="N",
                   help="at most N configs of the space measured per job (default: all, or a quarter for "
                        "budgeted); the heuristic default is timed besides, as the speedup's baseline")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tune in N local processes, one per GPU")
    p.add_argument("--compile-workers", type=int, default=None, metavar="N",
                   help="compile each batch of configs in N processes before timing it (default: up to 8 on a "
                        "GPU, bounded by cores and GPU memory; 0 under the interpreter)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="spread the jobs over a Ray cluster ('auto', 'ray://host:10001', or 'local')")
    p.add_argument("--retune", action="store_true", help="tune again what the database already holds")
    p.add_argument("--show", action="store_true", help="list what the tuning database holds and exit")
    p.add_argument("--slug", default=None, type=slug_argument,
                   help="device slug for --show (default: this machine's) and --merge (default: the files' own)")
    p.add_argument("--merge", nargs="+", metavar="FILE", default=None,
                   help="merge database files into the database of the device they name (or --slug's), in "
                        "--config-dir; keeps the faster winner per entry")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="database folder to read and write (default: $TRITONLAB_CONFIG_DIR or "
                        "~/.cache/tritonlab/configs); autotune/configs to update the shipped files")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers more tunable kernels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the budgeted search")
    p.add_argument("--vs-triton-autotune", action="store_true",
                   help="per job, our pick (database entry, else tuned) against @triton.autotune's winner over "
                        "the same pruned space, both timed side by side; --budget then only stops new jobs")
    p.add_argument("--rounds", type=int, default=5, metavar="N",
                   help="with --vs-triton-autotune: interleaved timing rounds per config (default 5)")
    p.add_argument("--out", default=None, metavar="FILE", type=output_file_argument,
                   help="with --vs-triton-autotune: also write the table to FILE (.md, .csv or .json), "
                        "rewritten after every job")


def _is_number(v: object) -> bool:
    """A real number of a database entry (a hand-edited one may hold a string or a bool instead)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if not _is_number(v):  # a hand-edited entry: show it as it is
        return str(v)
    return f"{v:.4f}" if v < 1 else f"{v:.3f}"


def _fmt_speedup(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}x" if _is_number(v) else str(v)


def _fmt_config(cfg: Optional[dict]) -> str:
    return "-" if not cfg else " ".join(f"{k}={v}" for k, v in cfg.items())


def _fmt_shape(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _geomean(values: list[float]) -> Optional[float]:
    vals = [v for v in values if _is_number(v) and 0 < v < math.inf]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _this_slug() -> str:
    from .runner import tuning_device
    from .device import device_slug

    return device_slug(tuning_device())


def _show(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from .database import TuningDB, available_slugs, shipped_config_dir, user_config_dir

    slug = args.slug or _this_slug()
    db = TuningDB(slug, user_dir=args.config_dir)
    rows = db.entries()
    console.print(f"tuning database for [bold]{slug}[/]: user {db.user_file.path}, shipped {db.shipped_file.path}")
    if not rows:
        others = available_slugs(args.config_dir or user_config_dir(), shipped_config_dir())
        console.print(f"no entries for {slug}." + (f" Databases exist for: {', '.join(others)}" if others else ""))
        return 0
    table = Table(title=f"{len(rows)} entries")
    for col in ("kernel", "dtype", "bucket", "config", "tuned ms", "default ms", "speedup", "source", "date"):
        table.add_column(col, justify="right" if col.endswith(("ms", "speedup")) else "left")
    for kernel, dtype, key, entry, source in rows:
        table.add_row(kernel, dtype, key, _fmt_config(entry.get("config")), _fmt_ms(entry.get("time_ms")),
                      _fmt_ms(entry.get("default_time_ms")), _fmt_speedup(entry.get("speedup")),
                      source + ("" if entry.get("complete", True) else " (partial)"), str(entry.get("date", "")))
    console.print(table)
    return 0


def _merge(args: argparse.Namespace, console) -> int:
    import json

    from .database import check_slug, merge_files, user_config_dir

    slugs = set()
    for f in args.merge:
        if not Path(f).is_file():
            console.print(f"[red]--merge: {f} does not exist[/]")
            return 2
        try:
            named = json.loads(Path(f).read_text()).get("slug")
        except (ValueError, AttributeError):
            named = None
        if named is not None and not isinstance(named, str):  # [1], {"a": 1} or 5: names no file
            if args.slug is None:
                console.print(f"[red]--merge: {f} names its device slug {named!r}, not a string; "
                              "name the database to merge into with --slug[/]")
                return 2
            continue
        slugs.add(named or Path(f).stem)
    if args.slug is None and len(slugs) > 1:
        console.print(f"[red]--merge: the files are for different devices {sorted(map(str, slugs))}; "
                      "name the database to merge into with --slug[/]")
        return 2
    try:
        slug = check_slug(args.slug or slugs.pop())
        dest = Path(args.config_dir or user_config_dir()) / f"{slug}.json"
        counts = merge_files(args.merge, dest)
    except ValueError as e:
        console.print(f"[red]--merge: {e}[/]")
        return 2
    console.print(f"merged {len(args.merge)} file(s) into {dest}: {counts['added']} added, "
                  f"{counts['replaced']} replaced by a faster winner, {counts['kept']} kept")
    return 0


def _closing_table(console, summaries: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="autotune: tuned vs heuristic default (median ms)")
    for col in ("kernel", "dtype", "shape", "default ms", "tuned ms", "speedup", "config", "measured", "status"):
        table.add_column(col, justify="right" if col.endswith(("ms", "speedup", "measured")) else "left")
    for s in sorted(summaries, key=lambda s: (s["kernel"], s["dtype"], s["key"])):
        status = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
        table.add_row(s["kernel"], s["dtype"], _fmt_shape(s["shape"]), _fmt_ms(s.get("default_time_ms")),
                      _fmt_ms(s.get("time_ms")), _fmt_speedup(s.get("speedup")), _fmt_config(s.get("config")),
                      f"{s.get('measured', 0)}/{s.get('space', 0)}", status)
    console.print(table)
    geo = _geomean([s.get("speedup") for s in summaries if s["status"] in ("tuned", "cached")])
    if geo is not None:
        console.print(f"geometric-mean speedup over the heuristic defaults: {geo:.3f}x")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import provider
    from .runner import Options, import_plugins, plan, summary_from_entry, tuning_device

    # a wide table when the output is a file or a pipe (rich would wrap it at 80 columns)
    console = Console(width=None if sys.stdout.isatty() else 200)
    err = Console(stderr=True)
    try:
        import_plugins(args.imports)
    except ImportError as e:
        err.print(f"tritonlab autotune: --import failed: {e}")
        return 2
    if args.show:
        return _show(args, console)
    if args.merge:
        return _merge(args, console)

    import torch

    from ..kernels._triton import HAS_TRITON, interpreting

    if not HAS_TRITON:
        err.print("tritonlab autotune: Triton is not installed here, so there is nothing to tune "
                  "(the torch fallbacks need no tuning).")
        return 2
    if args.ray is None and not torch.cuda.is_available() and not interpreting():
        err.print("tritonlab autotune: no GPU to tune on this machine (torch sees no CUDA device). Tuning "
                  "times Triton kernels on a GPU. To exercise the pipeline on the CPU anyway (its times mean "
                  "nothing), set TRITON_INTERPRET=1 and use --preset small.")
        return 2
    if args.workers < 1:
        err.print(f"tritonlab autotune: --workers must be >= 1, got {args.workers}")
        return 2
    if args.budget is not None and not (args.budget > 0 and math.isfinite(args.budget)):  # NaN fails too
        err.print(f"tritonlab autotune: --budget must be a positive number of minutes, got {args.budget}")
        return 2
    if args.max_measurements is not None and args.max_measurements < 1:
        err.print(f"tritonlab autotune: --max-measurements must be >= 1, got {args.max_measurements}")
        return 2
    try:
        jobs = plan(args.kernel, args.preset, args.dtype)
    except ValueError as e:
        err.print(f"tritonlab autotune: {e}")
        return 2
    if not jobs:
        err.print(f"tritonlab autotune: the kernels have no shapes in preset {args.preset!r}")
        return 2
    if interpreting() and not torch.cuda.is_available():
        err.print("[yellow]Triton interpreter on the CPU: the pipeline runs, but its times say nothing "
                  "about a GPU (entries go to the 'cpu' database).[/]")

    strategy = args.strategy or ("budgeted" if args.budget is not None else "exhaustive")
    if args.vs_triton_autotune:
        from .versus import run_cli as run_versus

        # no deadline inside our searches: Triton's search is not cut short either
        options = Options(strategy=strategy, max_measurements=args.max_measurements, config_dir=args.config_dir,
                          imports=tuple(args.imports), retune=args.retune, seed=args.seed)
        rc = run_versus(args, jobs, options, console, err)
        provider.reset()
        return rc
    start = time.time()
    deadline = start + 60 * args.budget if args.budget is not None else None
    if args.compile_workers is not None and args.compile_workers < 0:
        err.print(f"tritonlab autotune: --compile-workers must be >= 0, got {args.compile_workers}")
        return 2
    if args.compile_workers and (args.workers > 1 or args.ray is not None):
        err.print("tritonlab autotune: --compile-workers needs the in-process tuner (not --workers > 1 or --ray, "
                  "whose worker processes cannot start processes of their own)")
        return 2
    compile_workers = args.compile_workers
    if compile_workers is None:
        from .compile_pool import default_workers

        compile_workers = default_workers(tuning_device()) if args.ray is None and args.workers == 1 else 0
    options = Options(strategy=strategy, max_measurements=args.max_measurements, deadline=deadline,
                      config_dir=args.config_dir, imports=tuple(args.imports), retune=args.retune, seed=args.seed,
                      compile_workers=compile_workers)

    summaries: list[dict] = []
    todo = jobs
    if args.ray is None:
        from .runner import database_for

        db = database_for(_this_slug(), options)
        if not args.retune:
            todo = []
            for job in jobs:
                if db.has(job.kernel, job.shape_dict, job.dtype):
                    summaries.append(summary_from_entry(job, db.get(job.kernel, job.shape_dict, job.dtype)))
                else:
                    todo.append(job)
        console.print(f"{len(jobs)} job(s) in preset {args.preset!r}: {len(jobs) - len(todo)} already in "
                      f"{db.user_file.path.parent}, {len(todo)} to tune ({strategy})")
        if not todo:
            console.print("nothing new to tune")
            _closing_table(console, summaries)
            return 0
    if deadline is not None:
        lanes = 1 if args.ray is not None else args.workers
        options = dataclasses.replace(options, job_time_s=2 * 60 * args.budget * lanes / max(1, len(todo)))

    rc = _run_jobs(args, options, todo, summaries, console, err)
    provider.reset()  # this process's lookups see the new entries
    if rc:
        return rc
    _closing_table(console, summaries)
    failed = [s for s in summaries if s["status"] == "failed"]
    return 1 if failed else 0


def _run_jobs(args, options, todo, summaries, console, err) -> int:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    from .runner import run_pool, run_ray, run_serial

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=False)
    task = progress.add_task("tuning", total=len(todo))
    counters = {"trials": 0, "job": None}

    def on_result(summary: dict) -> None:
        summaries.append(summary)
        sp = summary.get("speedup")
        progress.update(task, advance=1, description=f"{summary['kernel']} {_fmt_shape(summary['shape'])} "
                        f"{summary['status']}" + ("" if sp is None else f" {sp:.2f}x"))

    def on_trial(job, trial) -> None:
        if counters["job"] != job:
            counters["job"], counters["trials"] = job, 0
        counters["trials"] += 1
        progress.update(task, description=f"{job.label()} [{counters['trials']} configs]")

    try:
        with progress:
            if args.ray is not None:
                from .runner import import_ray, shutdown_ray

                try:
                    import_ray()
                except RuntimeError as e:
                    err.print(f"tritonlab autotune: {e}")
                    return 2
                try:
                    done = run_ray(todo, options, args.ray, on_result)
                except (RuntimeError, ConnectionError, ValueError) as e:  # no cluster there, no GPU in it
                    err.print(f"tritonlab autotune: --ray {args.ray}: {type(e).__name__}: {e}")
                    return 2
                finally:
                    shutdown_ray()
                summaries.extend(done)
                progress.update(task, advance=len(done))
            elif args.workers > 1:
                try:
                    run_pool(todo, options, args.workers, on_result)
                except ValueError as e:
                    err.print(f"tritonlab autotune: {e}")
                    return 2
            else:
                run_serial(todo, options, on_result, on_trial=on_trial)
    except KeyboardInterrupt:
        err.print(f"interrupted: {len(summaries)} job(s) finished and kept; run again to tune the rest")
        _closing_table(console, summaries)
        return 130
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run as `python -m tritonlab.autotune.cli ...` (the same as `tritonlab autotune ...`)."""
    parser = argparse.ArgumentParser(prog="tritonlab autotune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
