"""Our tuner's pick against `@triton.autotune`'s winner over the same space, timed side by side.

    tritonlab autotune --vs-triton-autotune [--kernel K ...] [--preset P] [--strategy S] [--out FILE]

For each job (kernel, shape, dtype):
1. our pick: the database entry if there is one (else the tuner runs with the chosen strategy and
   writes it, exactly as `tritonlab autotune` would);
2. Triton's pick: Triton's own autotuner class (`triton.autotune(configs=..., key=[...])`, i.e.
   `triton.runtime.autotuner.Autotuner`) run over the same configs our tuner searches -- the
   kernel's space after `tuner.prune`, plus the heuristic default, which our tuner also measures --
   with its default benchmarker on a GPU (`driver.active.get_benchmarker()`, i.e.
   `triton.testing.do_bench` with quantiles (0.5, 0.2, 0.8), Triton's own warm-up and repetitions);
3. both winners checked against the float64 reference (Triton's autotuner does not check results,
   so its winner may be a config ours rejected as wrong);
4. both configs timed side by side, interleaved (ours, Triton's, Triton's, ours, ...), `rounds`
   times each, the median of each and the spread of the per-round ratios reported.

How the real Autotuner drives a launcher that takes a config dict: our kernels are not decorated
with `@triton.autotune` (their launchers take the config from the tuning database), so
`KernelAdapter` stands in for the `@triton.jit` function. The Autotuner needs from it only
`arg_names`, `run(*args, **config.all_kwargs())` and a `.fn` chain ending at a plain function (it
walks `.fn` to name the kernel). Each `triton.Config` carries the config's block sizes as kwargs,
num_warps/num_stages/num_ctas/maxnreg as its own fields, and the config's key as the extra kwarg
`TRITONLAB_CONFIG`, so that `run` recovers the exact dict and calls `TunableKernel.run(inputs, config)`.

Triton 3.6 and 3.9 share this interface (checked against both autotuner.py files). Where versions
differ the code looks at signatures and attributes, not version strings: `do_bench=` and
`cache_results=` are passed only when `triton.autotune` accepts them; the on-disk autotune cache is
switched off on the instance (its key needs a JITFunction, and a cached result would hide the search
time); an autotuning listener (knobs.autotuning.listener) is unset during the search for the same
reason. One deliberate difference from a decorated kernel: a config whose launch raises anything is
reported to the Autotuner as an `OutOfResources` subclass, so it scores inf (as Triton scores
out-of-resources, PTXAS and compile-assert failures) instead of aborting the whole search.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ..kernels._tuning import Config, TunableKernel
from .database import config_key

#: the kwarg of each triton.Config that names our config dict (an ordinary, hashable string)
CONFIG_KWARG = "TRITONLAB_CONFIG"
#: config keys that are triton.Config fields rather than kernel meta-parameters
LAUNCH_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
#: per-round ratios within this of 1 count as equal even when the rounds agree closely
NOISE_FLOOR = 0.02
#: side-by-side timing on a GPU: do_bench windows (ms), longer than the tuner's (this is the claim)
SIDE_BY_SIDE_WARMUP_MS = 25
SIDE_BY_SIDE_REP_MS = 100

Timer = Callable[[Callable[[], Any], Mapping[str, Any]], float]


# ----------------------------------------------------------------------------- Triton's autotuner

_config_failed_cls = None


def config_failed_error() -> type:
    """An exception class Triton's Autotuner catches (scoring the config inf): a subclass of
    triton.runtime.errors.OutOfResources with its own constructor (OutOfResources' arguments are
    not ours to rely on)."""
    global _config_failed_cls
    if _config_failed_cls is None:
        from triton.runtime.errors import OutOfResources

        class ConfigFailed(OutOfResources):
            """A config's launch raised: the Autotuner scores it inf and goes on."""

            def __init__(self, message: str):
                Exception.__init__(self, message)
                self.message = message
                self.required, self.limit, self.name = None, None, message

            def __str__(self) -> str:
                return self.message

            def __reduce__(self):
                return (type(self), (self.message,))

        _config_failed_cls = ConfigFailed
    return _config_failed_cls


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".strip()


class KernelAdapter:
    """Stands in for a `@triton.jit` function under `triton.autotune`: `run(inputs, problem, **meta)`
    launches `kernel.run(inputs, config)` with the config that meta[CONFIG_KWARG] names.

    `problem` (a label of the job) is the Autotuner's key argument; `last_config` is the config of
    the latest launch (an injected do_bench reads it), `launches` counts launches per config key and
    `failures` records why a config's launch raised.
    """

    arg_names = ["inputs", "problem"]

    def __init__(self, kernel: TunableKernel, configs: Sequence[Config]):
        self.kernel = kernel
        self.configs = {config_key(c): dict(c) for c in configs}
        self.last_config: Optional[dict] = None
        self.launches: dict[str, int] = {}
        self.failures: dict[str, str] = {}

        def launch(inputs: Any, problem: str, **meta: Any) -> Any:
            return self.run(inputs, problem, **meta)

        # The Autotuner walks `.fn` until it finds a plain function (it prints its __name__).
        launch.__name__ = launch.__qualname__ = kernel.name
        self.fn = launch
        self.__name__ = kernel.name

    def run(self, inputs: Any, problem: str, **meta: Any) -> Any:
        key = meta.get(CONFIG_KWARG)
        if key not in self.configs:
            raise KeyError(f"{CONFIG_KWARG}={key!r} is not one of the {len(self.configs)} configs of this search")
        config = self.configs[key]
        self.last_config = config
        self.launches[key] = self.launches.get(key, 0) + 1
        try:
            return self.kernel.run(inputs, dict(config))
        except Exception as e:
            self.failures[key] = _why(e)
            raise config_failed_error()(f"{self.kernel.name} {key}: {_why(e)}") from e


def triton_config(config: Mapping[str, Any]):
    """The triton.Config for one of our config dicts (launch fields as fields, the rest as kwargs,
    plus CONFIG_KWARG naming the dict). Absent launch fields keep triton.Config's defaults; the
    adapter launches our dict, so those defaults never reach the kernel."""
    import triton

    kwargs = {k: v for k, v in config.items() if k not in LAUNCH_FIELDS}
    kwargs[CONFIG_KWARG] = config_key(config)
    fields = {k: config[k] for k in LAUNCH_FIELDS if k in config}
    return triton.Config(kwargs, **fields)


def do_bench_from_timer(timer: Timer, adapter: KernelAdapter) -> Callable:
    """A do_bench for the Autotuner from one of our timers (timer(fn, config) -> ms): runs the call
    once first, as triton.testing.do_bench does (a failing config raises there), then times it and
    returns the quantiles the Autotuner asked for (all equal to the timer's value)."""

    def do_bench(kernel_call: Callable[[], Any], quantiles: Optional[Sequence[float]] = None, **_: Any):
        kernel_call()
        ms = float(timer(kernel_call, dict(adapter.last_config or {})))
        if not math.isfinite(ms) or ms <= 0:
            ms = float("inf")
        return [ms] * len(quantiles) if quantiles else ms

    return do_bench


@contextlib.contextmanager
def _no_autotune_listener():
    """Unset knobs.autotuning.listener while our Autotuner runs (it would look for a JITFunction)."""
    try:
        from triton import knobs

        tuning = knobs.autotuning
        listener = getattr(tuning, "listener", None)
    except Exception:  # a Triton without knobs: nothing to unset
        tuning, listener = None, None
    if listener is None:
        yield
        return
    tuning.listener = None
    try:
        yield
    finally:
        tuning.listener = listener


def make_autotuner(adapter: KernelAdapter, configs: Sequence[Config], do_bench: Optional[Callable] = None):
    """Triton's own Autotuner over the configs, wrapping the adapter (through `triton.autotune`)."""
    import inspect

    import triton

    params = inspect.signature(triton.autotune).parameters
    kw: dict[str, Any] = {"configs": [triton_config(c) for c in configs], "key": ["problem"]}
    if "cache_results" in params:
        kw["cache_results"] = False
    if do_bench is not None and "do_bench" in params:
        kw["do_bench"] = do_bench
    autotuner = triton.autotune(**kw)(adapter)
    if do_bench is not None and "do_bench" not in params:  # an older Triton: set the benchmarker on the instance
        autotuner._do_bench = do_bench
        autotuner.__dict__["do_bench"] = do_bench
    if hasattr(autotuner, "cache_results"):  # TRITON_CACHE_AUTOTUNING=1 would turn it on
        autotuner.cache_results = False
    return autotuner


@dataclass
class TritonPick:
    """What Triton's Autotuner chose for one job."""

    config: Optional[dict] = None
    time_ms: Optional[float] = None  # the Autotuner's own median for its winner
    timings: dict[str, Optional[float]] = field(default_factory=dict)  # config key -> median ms (None: inf)
    search_s: Optional[float] = None  # Autotuner.bench_time (compiles included), else the wall time of run()
    measured: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    error: Optional[str] = None
    autotuner: Any = None

    @property
    def ok(self) -> bool:
        return self.config is not None and self.error is None


def _median_of(timing: Any) -> Optional[float]:
    value = timing[0] if isinstance(timing, (list, tuple)) else timing
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def search_space(kernel: TunableKernel, shape: Mapping[str, int], dtype: torch.dtype,
                 device: torch.device) -> list[dict]:
    """The configs our tuner searches for a problem: the pruned space, and the heuristic default
    (which our tuner always measures) when the space lacks it."""
    from .tuner import prune

    kept, _ = prune(kernel, shape, [dict(c) for c in kernel.space(shape)], dtype, device)
    default = dict(kernel.default(shape))
    if config_key(default) not in {config_key(c) for c in kept}:
        kept.append(default)
    return kept


def triton_autotune_pick(kernel: TunableKernel, shape: Mapping[str, int], dtype: torch.dtype,
                         device: torch.device, *, configs: Optional[Sequence[Config]] = None,
                         inputs: Any = None, do_bench: Optional[Callable] = None,
                         timer: Optional[Timer] = None) -> TritonPick:
    """Run Triton's Autotuner over `configs` (default: `search_space`) for one problem.

    The benchmarker: `do_bench` if given, else one made from `timer`, else Triton's default (on a
    GPU the real thing; under the interpreter pass a timer). Never raises for a failing config.
    """
    shape = {k: int(v) for k, v in shape.items()}
    configs = [dict(c) for c in (configs if configs is not None else search_space(kernel, shape, dtype, device))]
    pick = TritonPick()
    if not configs:
        pick.error = "no config to search"
        return pick
    if inputs is None:
        inputs = kernel.make_inputs(shape, dtype, device)
    adapter = KernelAdapter(kernel, configs)
    if do_bench is None and timer is not None:
        do_bench = do_bench_from_timer(timer, adapter)
    autotuner = make_autotuner(adapter, configs, do_bench)
    pick.autotuner = autotuner
    problem = f"{kernel.name} {dtype} " + ",".join(f"{k}={v}" for k, v in shape.items())
    start = time.perf_counter()
    try:
        with _no_autotune_listener():
            autotuner.run(inputs, problem)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # every config failed: the winner's final launch raises
        pick.error = f"Triton's autotuner failed: {_why(e)}"
    wall = time.perf_counter() - start
    pick.search_s = getattr(autotuner, "bench_time", None) or wall
    timings = getattr(autotuner, "configs_timings", None) or {}
    pick.timings = {c.kwargs[CONFIG_KWARG]: _median_of(t) for c, t in timings.items()}
    pick.measured = len(timings)
    pick.failures = dict(adapter.failures)
    best = getattr(autotuner, "best_config", None)
    if best is not None:
        pick.config = dict(adapter.configs[best.kwargs[CONFIG_KWARG]])
        pick.time_ms = pick.timings.get(config_key(pick.config))
    elif pick.error is None:
        pick.error = "Triton's autotuner chose no config"
    return pick


# ----------------------------------------------------------------------------- side by side

def side_by_side_timer(fn: Callable[[], Any], config: Mapping[str, Any] | None = None) -> float:
    """Median ms by triton.testing.do_bench (L2 flushed), with Triton's default windows."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=SIDE_BY_SIDE_WARMUP_MS, rep=SIDE_BY_SIDE_REP_MS, return_mode="median"))


def time_side_by_side(kernel: TunableKernel, inputs: Any, ours: Config, theirs: Config, timer: Timer,
                      rounds: int = 5) -> tuple[list[float], list[float]]:
    """Time both configs `rounds` times each, interleaved, alternating which goes first; small
    inputs rotate over copies as in the tuner. Returns (our times, their times) in ms."""
    from .tuner import _rotations

    sets = _rotations(inputs)

    def call(cfg: Config) -> Callable[[], Any]:
        state = {"i": 0}

        def fn() -> Any:
            state["i"] = (state["i"] + 1) % len(sets)
            return kernel.run(sets[state["i"]], dict(cfg))

        return fn

    ours_fn, theirs_fn = call(ours), call(theirs)
    ours_ms, theirs_ms = [], []
    for r in range(max(1, int(rounds))):
        order = [(ours_fn, ours, ours_ms), (theirs_fn, theirs, theirs_ms)]
        for fn, cfg, out in (order if r % 2 == 0 else order[::-1]):
            out.append(float(timer(fn, dict(cfg))))
    return ours_ms, theirs_ms


def verdict(ratio: Optional[float], lo: Optional[float], hi: Optional[float], same: bool) -> str:
    """'same config', 'equal within noise' (1 inside the per-round ratio range, or within
    NOISE_FLOOR), else who is faster."""
    if same:
        return "same config"
    if ratio is None:
        return "-"
    if abs(ratio - 1.0) <= NOISE_FLOOR or (lo is not None and hi is not None and lo <= 1.0 <= hi):
        return "equal within noise"
    return "ours faster" if ratio < 1.0 else "triton faster"


# ----------------------------------------------------------------------------- one job

def _timers(device: torch.device, injected: Optional[Timer]) -> tuple[Optional[Timer], Timer]:
    """(timer for Triton's autotuner or None for Triton's own benchmarker, side-by-side timer)."""
    from . import tuner

    if injected is not None:
        return injected, injected
    if device.type == "cuda":
        return None, side_by_side_timer
    t = tuner.default_timer(device)  # the interpreter: wall clock (meaningless for speed)
    return t, t


def compare_job(job, options, *, rounds: int = 5) -> dict:
    """One row of the comparison (see the module docstring); never raises for a tuning failure.
    `options` is a runner.Options: its timer (if any) serves our tuner, Triton's autotuner and the
    side-by-side timing alike."""
    from ..kernels._tuning import registered
    from .runner import parse_dtype, run_job, tuning_device

    row: dict[str, Any] = {"kernel": job.kernel, "dtype": job.dtype, "shape": job.shape_dict, "status": "ok",
                           "reason": ""}
    start = time.perf_counter()
    ours = run_job(job, options)
    our_wall = time.perf_counter() - start
    row.update(our_config=ours.get("config"), our_source=ours["status"], our_strategy=ours.get("strategy"),
               our_measured=ours.get("measured"), space=ours.get("space"),
               our_search_s=(round(our_wall, 3) if ours["status"] == "tuned" else ours.get("search_s")))
    if ours["status"] not in ("tuned", "cached") or not ours.get("config"):
        row.update(status="failed", reason=f"our tuner: {ours['status']}: {ours.get('reason', '')}")
        return row
    try:
        kernel = registered()[job.kernel]
        device = tuning_device()
        dtype = parse_dtype(job.dtype)
        shape = job.shape_dict
        inputs = kernel.make_inputs(shape, dtype, device)
        configs = search_space(kernel, shape, dtype, device)
        triton_timer, sbs_timer = _timers(device, options.timer)
        pick = triton_autotune_pick(kernel, shape, dtype, device, configs=configs, inputs=inputs, timer=triton_timer)
    except Exception as e:
        row.update(status="failed", reason=f"Triton's autotuner: {_why(e)}")
        return row
    row.update(triton_config=pick.config, triton_search_s=None if pick.search_s is None else round(pick.search_s, 3),
               triton_measured=pick.measured, triton_failed=len(pick.failures), triton_space=len(configs))
    if not pick.ok:
        row.update(status="failed", reason=pick.error or "")
        return row
    tolerance = float(kernel.tolerance(dtype))
    for who, cfg in (("our", row["our_config"]), ("triton", pick.config)):
        try:
            out = kernel.run(inputs, dict(cfg))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            err = float(kernel.error(inputs, out))
            row[f"{who}_correct"] = bool(err <= tolerance)
            row[f"{who}_error"] = err
        except Exception as e:
            row[f"{who}_correct"], row[f"{who}_error"] = False, None
            row["reason"] = (row["reason"] + f"; {who} winner: {_why(e)}").lstrip("; ")
    same = config_key(row["our_config"]) == config_key(pick.config)
    row["same_config"] = same
    if not (row["our_correct"] and row["triton_correct"]):
        wrong = [w for w in ("our", "triton") if not row[f"{w}_correct"]]
        row["reason"] = (row["reason"] + f"; {' and '.join(wrong)} winner fails the reference check "
                         "(not timed)").lstrip("; ")
        row["status"] = "wrong"
        return row
    try:
        ours_ms, theirs_ms = time_side_by_side(kernel, inputs, row["our_config"], pick.config, sbs_timer, rounds)
    except Exception as e:
        row.update(status="failed", reason=f"side-by-side timing: {_why(e)}")
        return row
    ratios = [a / b for a, b in zip(ours_ms, theirs_ms) if b > 0]
    row.update(our_ms=statistics.median(ours_ms), triton_ms=statistics.median(theirs_ms), rounds=len(ours_ms))
    row["ratio"] = row["our_ms"] / row["triton_ms"] if row["triton_ms"] > 0 else None
    row["ratio_lo"], row["ratio_hi"] = (min(ratios), max(ratios)) if ratios else (None, None)
    row["verdict"] = verdict(row["ratio"], row["ratio_lo"], row["ratio_hi"], same)
    return row


# ----------------------------------------------------------------------------- tables and files

COLUMNS = [
    ("kernel", "kernel"), ("dtype", "dtype"), ("shape", "shape"), ("our_config", "our config"),
    ("triton_config", "triton.autotune config"), ("our_ms", "ours ms"), ("triton_ms", "triton ms"),
    ("ratio", "ours/triton"), ("noise", "per-round range"), ("verdict", "verdict"),
    ("our_search", "our search"), ("triton_search", "triton search"), ("status", "status"),
]


def _fmt_ms(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.4f}" if v < 1 else f"{v:.3f}")


def _fmt_config(cfg: Optional[Mapping[str, Any]]) -> str:
    return "-" if not cfg else " ".join(f"{k}={v}" for k, v in cfg.items())


def _fmt_search(seconds: Optional[float], measured: Any, space: Any, source: Optional[str] = None) -> str:
    text = "-" if seconds is None else f"{seconds:.1f}s"
    if measured is not None and space:
        text += f" ({measured}/{space})"
    if source == "cached":
        text += " db"
    return text


def format_row(row: Mapping[str, Any]) -> dict[str, str]:
    """A row as display strings, by COLUMNS key."""
    ratio, lo, hi = row.get("ratio"), row.get("ratio_lo"), row.get("ratio_hi")
    status = row.get("status", "")
    if row.get("reason"):
        status += f": {row['reason']}"
    return {
        "kernel": row["kernel"], "dtype": row["dtype"],
        "shape": ",".join(f"{k}={v}" for k, v in row["shape"].items()),
        "our_config": _fmt_config(row.get("our_config")), "triton_config": _fmt_config(row.get("triton_config")),
        "our_ms": _fmt_ms(row.get("our_ms")), "triton_ms": _fmt_ms(row.get("triton_ms")),
        "ratio": "-" if ratio is None else f"{ratio:.3f}",
        "noise": "-" if lo is None else f"{lo:.3f}..{hi:.3f}",
        "verdict": row.get("verdict", "-"),
        "our_search": _fmt_search(row.get("our_search_s"), row.get("our_measured"), row.get("space"),
                                  row.get("our_source")),
        "triton_search": _fmt_search(row.get("triton_search_s"), row.get("triton_measured"), row.get("triton_space")),
        "status": status,
    }


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Geometric mean of ours/triton over the timed rows, and how many rows are equal within noise."""
    timed = [r for r in rows if r.get("ratio")]
    geo = math.exp(sum(math.log(r["ratio"]) for r in timed) / len(timed)) if timed else None
    equal = sum(1 for r in timed if r.get("verdict") in ("same config", "equal within noise"))
    return {"jobs": len(rows), "timed": len(timed), "equal": equal, "geomean_ratio": geo,
            "ours_faster": sum(1 for r in timed if r.get("verdict") == "ours faster"),
            "triton_faster": sum(1 for r in timed if r.get("verdict") == "triton faster")}


def summary_line(rows: Sequence[Mapping[str, Any]]) -> str:
    s = summarize(rows)
    geo = "-" if s["geomean_ratio"] is None else f"{s['geomean_ratio']:.3f}"
    return (f"{s['timed']}/{s['jobs']} job(s) timed: {s['equal']} same config or equal within noise, "
            f"{s['ours_faster']} ours faster, {s['triton_faster']} triton.autotune faster; "
            f"geometric mean of ours/triton time: {geo} (below 1: ours faster)")


def environment() -> dict[str, Any]:
    from .device import device_name
    from .runner import tuning_device

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    return {"device": device_name(tuning_device()), "triton": triton_version, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def to_markdown(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = ["# Our tuner vs `@triton.autotune` over the same space", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- {summary_line(rows)}", ""]
    lines.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        cells = format_row(row)
        lines.append("| " + " | ".join(cells[k].replace("|", "/") for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["kernel", "dtype", "shape", "our_config", "triton_config", "same_config", "our_ms", "triton_ms",
              "ratio", "ratio_lo", "ratio_hi", "rounds", "verdict", "our_search_s", "our_measured", "our_source",
              "our_strategy", "space", "triton_search_s", "triton_measured", "triton_failed", "triton_space",
              "our_correct", "triton_correct", "our_error", "triton_error", "status", "reason"]


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["shape"] = ",".join(f"{k}={v}" for k, v in row["shape"].items())
        for k in ("our_config", "triton_config"):
            flat[k] = config_key(row[k]) if row.get(k) else ""
        writer.writerow(flat)
    return buf.getvalue()


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> Path:
    """Write the rows to `path`: CSV for .csv, JSON for .json, markdown otherwise (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        text = to_csv(rows)
    elif path.suffix == ".json":
        text = json.dumps({"meta": dict(meta), "summary": summarize(rows), "rows": list(rows)}, indent=1, default=str)
    else:
        text = to_markdown(rows, meta)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the CLI path

def run_cli(args, jobs, options, console, err) -> int:
    """`tritonlab autotune --vs-triton-autotune`: compare every job, print the table, write --out
    after each job (a run cut short still leaves the finished rows). Returns the exit code."""
    from rich.table import Table

    from ..kernels._tuning import registered
    from .runner import parse_dtype, tuning_device

    if args.workers != 1 or args.ray is not None:
        err.print("tritonlab autotune --vs-triton-autotune: runs in this process on one GPU "
                  "(no --workers/--ray: the side-by-side timings must not share a GPU)")
        return 2
    if args.rounds < 1:
        err.print(f"tritonlab autotune: --rounds must be >= 1, got {args.rounds}")
        return 2
    device = tuning_device()
    reg = registered()

    def size(job) -> int:  # smallest searches first: a --budget then covers the most jobs
        try:
            return len(search_space(reg[job.kernel], job.shape_dict, parse_dtype(job.dtype), device))
        except Exception:
            return 0

    jobs = sorted(jobs, key=size)
    deadline = time.time() + 60 * args.budget if args.budget is not None else None
    meta = dict(environment(), preset=args.preset, strategy=options.strategy, rounds=args.rounds,
                command="tritonlab autotune " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["autotune"] else sys.argv[1:]))
    console.print(f"{len(jobs)} job(s): our tuner ({options.strategy}, or the database entry) vs triton.autotune "
                  f"over the same space, then {args.rounds} interleaved round(s) of timing each")
    rows: list[dict] = []
    for i, job in enumerate(jobs):
        if deadline is not None and time.time() >= deadline:
            err.print(f"--budget reached: {len(jobs) - i} job(s) not compared")
            break
        err.print(f"[{i + 1}/{len(jobs)}] {job.label()} ...")
        try:
            row = compare_job(job, options, rounds=args.rounds)
        except KeyboardInterrupt:
            err.print(f"interrupted: {len(rows)} job(s) compared")
            break
        rows.append(row)
        if args.out:
            write_table(args.out, rows, meta)
        cells = format_row(row)
        err.print(f"    {cells['verdict']} ours/triton {cells['ratio']} ({cells['noise']}), "
                  f"search {cells['our_search']} vs {cells['triton_search']}; {cells['status']}")

    table = Table(title="our tuner vs @triton.autotune over the same space (median ms, interleaved do_bench)")
    for key, title in COLUMNS:
        table.add_column(title, justify="right" if key in ("our_ms", "triton_ms", "ratio", "noise") else "left")
    for row in rows:
        cells = format_row(row)
        table.add_row(*(cells[k] for k, _ in COLUMNS))
    console.print(table)
    console.print(summary_line(rows))
    if args.out:
        path = write_table(args.out, rows, meta)
        console.print(f"written to {path}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0
