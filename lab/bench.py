"""The benchmark harness: run each case's providers, check them against the reference, then time them.

For one task (a case x shape x dtype) the harness
1. draws fresh random inputs (the seed goes into the results),
2. runs every provider once and checks its output against the float64 NumPy reference on a random
   subset of rows (lab/cases.py: CHECK_ROWS); a provider whose error exceeds the tolerance is
   reported "wrong" and is never timed; one that raises is "failed"; one that cannot run here (no
   such torch op, an old GPU) is "skipped",
3. times the providers that passed:
   - CUDA: triton.testing.do_bench for every row of a task (L2 flushed before every call; median,
     p20, p80 from its quantiles): one timer per task, so its ratios compare like with like. The
     view without host launch overhead comes from explicit captured rows ("-cudagraph" providers,
     lab/cases.py), timed the same way;
   - CPU: warm-up, then repetitions with the providers interleaved (A B C C B A A B C ...), so that
     slow drift of the machine (frequency, other load) falls on all of them alike; each sample
     repeats a call enough times to last about a millisecond; median, p20, p80 over the samples.

Results are tidy rows (RESULT_COLUMNS), one per task x provider; `finalize` adds throughput and speedups.
"""
from __future__ import annotations

import gc
import math
import random
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pandas as pd
import torch

from .cases import (CHECK_ELEMENTS, CHECK_ROWS, GRAPH_SUFFIX, OWN_FALLBACK, Case, Prepared, Provider, Unavailable,
                    default_error, shape_label)
from .kernels._accuracy import to_numpy

RESULT_COLUMNS = [
    "family", "kernel", "shape", "series", "size_key", "size", "dtype", "provider", "role", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "timer", "flops", "bytes", "tflops", "gbps", "compute",
    "roofline_ms", "roofline_frac", "bound", "primary_baseline", "speedup", "ours_speedup",
    "rel_err", "max_abs_err", "tolerance", "device", "seed", "note",
]
STATUSES = ("ok", "wrong", "skipped", "failed")

@dataclass
class Task:
    case: Case
    shape: dict
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.case.kernel} {shape_label(self.shape)} {self.dtype}"


@dataclass
class BenchOptions:
    device: torch.device
    compile_baselines: bool = False
    #: CPU: seconds of timing per task (all providers together), and bounds on the repetitions
    cpu_budget_s: float = 3.0
    cpu_min_reps: int = 5
    cpu_max_reps: int = 200
    cpu_warmup: int = 1
    #: CUDA: do_bench's warm-up and repetition times (ms)
    cuda_warmup_ms: int = 25
    cuda_rep_ms: int = 100
    check_rows: int = CHECK_ROWS
    check_elements: int = CHECK_ELEMENTS
    #: seed for the inputs; None draws a fresh one per task (recorded in the rows)
    seed: Optional[int] = None
    #: wall-clock seconds for the whole run: tasks not started by then are skipped (noted), so a
    #: run under an outer time limit still writes its report
    time_limit_s: Optional[float] = None


def preset_options(preset: str, device: torch.device, compile_baselines: Optional[bool] = None) -> BenchOptions:
    """Timing budgets per preset: "quick" keeps a whole CPU run under two minutes."""
    compile_baselines = (device.type == "cuda") if compile_baselines is None else compile_baselines
    if preset == "quick":  # a smoke run: few repetitions (the check call and the estimate call warm up)
        return BenchOptions(device, compile_baselines, cpu_budget_s=0.5, cpu_min_reps=3, cpu_max_reps=30,
                            cpu_warmup=0, cuda_warmup_ms=10, cuda_rep_ms=40)
    return BenchOptions(device, compile_baselines)


# ----------------------------------------------------------------------------- planning


def plan(cases: Iterable[Case], preset: str, device: torch.device) -> tuple[list[Task], list[dict], list[str]]:
    """Tasks to run, rows for the cases skipped as a whole (a family not importable yet), and notes."""
    tasks, skipped, notes = [], [], []
    for case in cases:
        sweep = case.presets.get(preset)
        if sweep is None:
            notes.append(f"{case.family}/{case.kernel}: no shapes in preset {preset!r}")
            continue
        missing = case.missing()
        for shape in sweep.shapes:
            for dtype in sweep.dtypes:
                if missing:
                    skipped.append(_row(case, shape, dtype, "tritonlab", "ours", device, status="skipped",
                                        note="not available yet: " + ", ".join(missing)))
                else:
                    tasks.append(Task(case, shape, dtype))
        if missing:
            notes.append(f"{case.family}/{case.kernel}: skipped, not available yet ({', '.join(missing)}); "
                         "it is measured once the family lands")
    return tasks, skipped, notes


def _row(case: Case, shape: dict, dtype: str, provider: str, role: str, device: torch.device, **kw: Any) -> dict:
    row = {c: None for c in RESULT_COLUMNS}
    size = shape.get(case.size_key)
    row.update(family=case.family, kernel=case.kernel, shape=shape_label(shape),
               series=shape_label({k: v for k, v in shape.items() if k != case.size_key}),
               size_key=case.size_key, size=size, dtype=dtype, provider=provider, role=role,
               flops=float(case.flops(shape)), bytes=float(case.bytes(shape, dtype)), compute=case.compute(dtype),
               device=str(device), note="")
    row.update(kw)
    return row


# ----------------------------------------------------------------------------- checking


def pick_rows(n_rows: int, row_elements: int, rng: np.random.Generator, max_rows: int = CHECK_ROWS,
              max_elements: int = CHECK_ELEMENTS) -> np.ndarray:
    """Sorted random row indices to check: the first and last row always, at most max_rows rows and
    about max_elements output elements."""
    if n_rows <= 0:
        return np.zeros(0, dtype=np.int64)
    n = int(min(n_rows, max_rows, max(1, max_elements // max(row_elements, 1))))
    picked = {0, n_rows - 1} if n > 1 else {0}
    if n > len(picked):
        rest = rng.choice(np.arange(1, n_rows - 1), size=n - len(picked), replace=False)
        picked.update(int(r) for r in rest)
    return np.array(sorted(picked), dtype=np.int64)


class NumpyInputs(Mapping):
    """float64 NumPy views of a task's inputs for the reference, converted on first access (a
    reference that needs one weight of several never pays for the others: at the GPU shapes a
    float64 copy of an expert weight is gigabytes). Row inputs are restricted to the checked rows;
    non-tensors pass as they are."""

    def __init__(self, inputs: dict, rows: np.ndarray, row_inputs: Iterable[str]):
        self._inputs, self._rows, self._row_inputs = inputs, rows, set(row_inputs)
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            value = self._inputs[key]
            if isinstance(value, torch.Tensor):
                if key in self._row_inputs:
                    value = value[torch.as_tensor(self._rows, device=value.device)]
                value = to_numpy(value)
            self._cache[key] = value
        return self._cache[key]

    def __iter__(self):
        return iter(self._inputs)

    def __len__(self) -> int:
        return len(self._inputs)


def numpy_inputs(inputs: dict, rows: np.ndarray, row_inputs: Iterable[str]) -> NumpyInputs:
    return NumpyInputs(inputs, rows, row_inputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# ----------------------------------------------------------------------------- timing


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    a = np.asarray(samples, dtype=np.float64)
    return float(np.median(a)), float(np.quantile(a, 0.2)), float(np.quantile(a, 0.8))


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], *, budget_s: float = 3.0, min_reps: int = 5,
                         max_reps: int = 200, warmup: int = 1, sample_s: float = 1e-3) -> dict[str, list[float]]:
    """Per-call times (ms) of each function, sampled in interleaved rounds.

    Round r runs the functions in order, round r + 1 in reverse (A B C, C B A, ...), so a drift of
    the machine's speed during the run lands on every function alike. A sample repeats a call
    `inner` times so that it lasts about `sample_s` (timer resolution and call overhead vanish).
    """
    names = list(fns)
    if not names:
        return {}
    est = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t0 = time.perf_counter()
        fns[name]()
        est[name] = max(time.perf_counter() - t0, 1e-7)
    inner = {n: int(min(1000, max(1, math.ceil(sample_s / est[n])))) for n in names}
    per_round = sum(inner[n] * est[n] for n in names)
    reps = int(min(max_reps, max(min_reps, budget_s // max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            for name in (names if r % 2 == 0 else reversed(names)):
                fn, k = fns[name], inner[name]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / k)
    finally:
        if gc_enabled:
            gc.enable()
    return samples


def time_cuda(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100) -> tuple[float, float, float, int, str]:
    """(median, p20, p80 in ms, samples, timer) for a CUDA callable: triton.testing.do_bench, which
    flushes the L2 cache before every call (CUDA events and our own flush without Triton)."""
    try:
        import triton.testing as tt
    except ImportError:  # pragma: no cover - CUDA without Triton: CUDA events, our own L2 flush
        return _time_cuda_events(fn, warmup_ms, rep_ms)
    med, p20, p80 = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80), 0, "do_bench (L2 flushed)"


def _time_cuda_events(fn, warmup_ms, rep_ms):  # pragma: no cover - needs a GPU without Triton
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / est))):
        cache.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    med, p20, p80 = _quantiles(times)
    return med, p20, p80, len(times), "CUDA events (L2 flushed)"


# ----------------------------------------------------------------------------- running


@dataclass
class Checked:
    """A task after the correctness pass: one row per provider, and the providers that may be timed."""

    rows: list[dict]
    ready: dict[str, Prepared] = field(default_factory=dict)
    providers: list[Provider] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    def row(self, name: str) -> dict:
        return next(r for r in self.rows if r["provider"] == name)


def check_task(task: Task, opts: BenchOptions, only: Optional[Iterable[str]] = None) -> Checked:
    """Draw inputs, run each provider (or those named in `only`) once and check it against the
    reference. Rows get status ok | wrong | failed | skipped; only ok providers are in `ready`."""
    case, shape, dtype, device = task.case, task.shape, task.dtype, opts.device
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**31)
    try:
        providers = case.providers(device, opts.compile_baselines, dtype)
    except Exception as e:
        return Checked([_row(case, shape, dtype, "tritonlab", "ours", device, status="failed", seed=seed,
                             note=f"providers: {_first_line(e)}")])
    if only is not None:
        wanted = set(only)
        providers = [p for p in providers if p.name in wanted]
    try:
        g = torch.Generator(device=device).manual_seed(seed)
        inputs = case.make_inputs(shape, dtype, device, g)
    except Exception as e:
        return Checked([_row(case, shape, dtype, p.name, p.role, device, status="failed", seed=seed,
                             note=f"inputs: {_first_line(e)}") for p in providers], providers=providers)
    inputs["_seed"], inputs["_dtype"], inputs["_device"] = seed, dtype, device.type
    n_rows, row_elements = case.rows_of(shape)
    rows = pick_rows(n_rows, row_elements, np.random.default_rng(seed), opts.check_rows, opts.check_elements)
    tol = float(case.tolerance(dtype, device))
    cache: dict[str, Any] = {}

    def case_reference():
        if "ref" not in cache:
            cache["ref"] = case.reference(numpy_inputs(inputs, rows, case.row_inputs))
        return cache["ref"]

    checked = Checked([], providers=providers, inputs=inputs)
    for p in providers:
        row = _row(case, shape, dtype, p.name, p.role, device, seed=seed, tolerance=tol)
        checked.rows.append(row)
        status, note = _check(p, inputs, rows, case, case_reference, tol, device, row)
        prep = row.pop("_prepared", None)
        row["status"], row["note"] = status, note
        if status == "ok":
            checked.ready[p.name] = prep
    return checked


def run_task(task: Task, opts: BenchOptions) -> list[dict]:
    """Check, then time, every provider of one task; one row per provider."""
    checked = check_task(task, opts)
    by_name = {r["provider"]: r for r in checked.rows}
    try:
        _time_ready(checked.ready, opts, by_name)
    except Exception as e:  # a provider that passed its check but fails when repeated
        for name in checked.ready:
            if by_name[name]["median_ms"] is None:
                by_name[name].update(status="failed", note=f"timing: {_first_line(e)}")
    rows = checked.rows
    del checked
    release_memory(opts.device)
    return rows


def _check(p: Provider, inputs: dict, rows: np.ndarray, case: Case, case_reference, tol: float,
           device: torch.device, row: dict) -> tuple[str, str]:
    """Run the provider once and compare with the reference. Returns (status, note); stores the
    Prepared in row["_prepared"] when it passed."""
    try:
        prep = p.setup(inputs, device)
    except Unavailable as e:
        return "skipped", str(e)
    except Exception as e:
        return "failed", f"setup: {_first_line(e)}"
    try:
        out = prep.fn()
        _sync(device)
    except Unavailable as e:
        return "skipped", str(e)
    except Exception as e:
        release_memory(device)
        return "failed", f"run: {_first_line(e)}"
    try:
        if prep.reference is not None:  # a baseline computing another function (the dense FFN)
            rel, max_abs = (prep.error or default_error)(out, prep.reference(rows), rows)
        else:
            rel, max_abs = case.error(out, case_reference(), rows)
    except Unavailable as e:
        return "skipped", str(e)
    except Exception as e:
        return "failed", f"check: {_first_line(e)}"
    finally:
        del out
    row["rel_err"], row["max_abs_err"] = float(rel), float(max_abs)
    if not (rel <= tol):  # NaN fails too
        return "wrong", f"relative error {rel:.3g} > tolerance {tol:.3g}: not timed"
    row["_prepared"] = prep
    return "ok", prep.note


def _time_ready(ready: dict[str, Prepared], opts: BenchOptions, by_name: dict[str, dict]) -> None:
    if not ready:
        return
    if opts.device.type == "cuda":
        for name, prep in ready.items():
            try:
                med, p20, p80, n, timer = time_cuda(prep.fn, warmup_ms=opts.cuda_warmup_ms, rep_ms=opts.cuda_rep_ms)
            except Exception as e:
                by_name[name].update(status="failed", note=f"timing: {_first_line(e)}")
                release_memory(opts.device)
                continue
            by_name[name].update(median_ms=med, p20_ms=p20, p80_ms=p80, reps=n or None, timer=timer)
        return
    samples = time_cpu_interleaved({n: p.fn for n, p in ready.items()}, budget_s=opts.cpu_budget_s,
                                   min_reps=opts.cpu_min_reps, max_reps=opts.cpu_max_reps, warmup=opts.cpu_warmup)
    for name, s in samples.items():
        med, p20, p80 = _quantiles(s)
        by_name[name].update(median_ms=med, p20_ms=p20, p80_ms=p80, reps=len(s), timer="CPU interleaved")


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def order_rows(rows: list[dict], case_list: list[Case]) -> list[dict]:
    """Rows in the cases' order (family, then kernel), keeping the order within a kernel."""
    rank = {(c.family, c.kernel): i for i, c in enumerate(case_list)}
    return sorted(rows, key=lambda r: rank.get((r["family"], r["kernel"]), len(rank)))


def run(tasks: list[Task], opts: BenchOptions, on_start: Optional[Callable[[Task], None]] = None,
        on_done: Optional[Callable[[Task, list[dict]], None]] = None) -> list[dict]:
    """Run every task; a task that crashes the harness itself becomes "failed" rows, never an abort."""
    rows: list[dict] = []
    t0 = time.perf_counter()
    for task in tasks:
        if on_start:
            on_start(task)
        if opts.time_limit_s is not None and time.perf_counter() - t0 > opts.time_limit_s:
            out = [_row(task.case, task.shape, task.dtype, "tritonlab", "ours", opts.device, status="skipped",
                        note=f"not run: the time limit of {opts.time_limit_s:.0f} s was reached")]
            rows.extend(out)
            if on_done:
                on_done(task, out)
            continue
        try:
            out = run_task(task, opts)
        except Exception as e:  # pragma: no cover - defensive: one bad case must not lose the report
            out = [_row(task.case, task.shape, task.dtype, "tritonlab", "ours", opts.device, status="failed",
                        note=f"harness: {_first_line(e)} {traceback.format_exc(limit=2).splitlines()[-1]}")]
        rows.extend(out)
        if on_done:
            on_done(task, out)
    return rows


# ----------------------------------------------------------------------------- results


#: the RESULT_COLUMNS that hold numbers (to_frame coerces them; anything else there becomes NaN)
NUMERIC_COLUMNS = ["size", "median_ms", "p20_ms", "p80_ms", "reps", "flops", "bytes", "tflops", "gbps", "roofline_ms",
                   "roofline_frac", "speedup", "ours_speedup", "rel_err", "max_abs_err", "tolerance", "seed"]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with exactly RESULT_COLUMNS (missing ones empty), in a stable order."""
    df = pd.DataFrame(rows)
    for c in RESULT_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[RESULT_COLUMNS]
    for c in NUMERIC_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in ("note", "timer", "bound", "primary_baseline"):
        df[c] = df[c].astype(object).fillna("").astype(str)  # object first: an all-empty CSV column is float64
    return df


def finalize(df: pd.DataFrame) -> pd.DataFrame:
    """Throughput and speedups.

    tflops/gbps: the case's stated FLOPs and bytes over the median time. Rows of calls captured in
    a CUDA graph (provider ending in GRAPH_SUFFIX) are compared among themselves, eager rows among
    themselves. primary_baseline: the first baseline (in the case's order) that ran ok, other than
    OWN_FALLBACK unless it is the only one (for captured rows: the first captured baseline); speedup =
    its median / this row's median (so our row says how much faster we are than the primary
    baseline); ours_speedup (baseline rows) = this baseline's median / our median, our speedup over
    each baseline.
    """
    df = df.copy()
    t = df["median_ms"] * 1e-3
    df["tflops"] = df["flops"] / t / 1e12
    df["gbps"] = df["bytes"] / t / 1e9
    df["primary_baseline"] = ""
    df["speedup"] = np.nan
    df["ours_speedup"] = np.nan
    keys = ["family", "kernel", "shape", "dtype"]
    captured = df["provider"].astype(str).str.endswith(GRAPH_SUFFIX)
    for _, task in df.groupby(keys, sort=False):
        for group in (task[~captured[task.index]], task[captured[task.index]]):
            ok = group[(group["status"] == "ok") & group["median_ms"].notna()]
            ours = ok[ok["role"] == "ours"]
            base = ok[ok["role"] == "baseline"]
            if len(base):
                external = base[~base["provider"].isin([OWN_FALLBACK, OWN_FALLBACK + GRAPH_SUFFIX])]
                primary = (external if len(external) else base).iloc[0]
                df.loc[group.index, "primary_baseline"] = primary["provider"]
                df.loc[ok.index, "speedup"] = primary["median_ms"] / ok["median_ms"]
            if len(ours):
                df.loc[base.index, "ours_speedup"] = base["median_ms"] / float(ours.iloc[0]["median_ms"])
    return df
