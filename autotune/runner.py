"""Tuning jobs and where they run: in this process, in N local processes (one per GPU), or on Ray.

A job is (kernel, shape, dtype). `run_job` tunes one in whatever process it lands in and writes the
entry through the database rules (locked, atomic, one entry at a time: a run killed half-way keeps
every finished job, and running again skips them). It returns a plain summary dict.

- `run_serial`: one after another in this process.
- `run_pool`: N spawned processes taking jobs from a queue; with CUDA, worker i sees only GPU i
  (CUDA_VISIBLE_DEVICES), so N GPUs tune in parallel and never disturb each other's timings.
- `run_ray`: the same jobs as Ray tasks (one GPU each, or one CPU under the interpreter). Ray is an
  optional extra (`pip install 'tritonlab[ray]'`), imported only here. The tasks return their entries
  and this process writes them, so the database is the driver's even when the workers are other
  machines.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..kernels._triton import interpreting
from .database import TuningDB, dtype_name, shape_key, token_dims_of
from .device import device_slug

Summary = dict[str, Any]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                  "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; ValueError naming the dtype otherwise."""
    if isinstance(name, torch.dtype):
        return name
    text = str(name).replace("torch.", "")
    dtype = getattr(torch, _DTYPE_ALIASES.get(text, text), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (e.g. bfloat16, float16, float32, int8)")
    return dtype


@dataclass(frozen=True)
class Job:
    kernel: str
    shape: tuple[tuple[str, int], ...]
    dtype: str

    @classmethod
    def make(cls, kernel: str, shape: dict, dtype: torch.dtype | str) -> "Job":
        return cls(kernel, tuple((k, int(v)) for k, v in shape.items()), dtype_name(dtype))

    @property
    def shape_dict(self) -> dict[str, int]:
        return dict(self.shape)

    def label(self) -> str:
        return f"{self.kernel} {self.dtype} " + ",".join(f"{k}={v}" for k, v in self.shape)


@dataclass(frozen=True)
class Options:
    """How jobs are tuned; picklable (it travels to worker processes and Ray tasks)."""

    strategy: str = "exhaustive"
    max_measurements: Optional[int] = None
    deadline: Optional[float] = None  # time.time() after which no job starts and no config is measured
    job_time_s: Optional[float] = None  # at most this long per job (a fair share of --budget)
    config_dir: Optional[str] = None  # the writable database folder (default: user_config_dir())
    imports: tuple[str, ...] = ()  # modules that register extra tunable kernels
    retune: bool = False
    seed: int = 0
    timer: Optional[Callable] = None  # timer(fn, config) -> ms; must be picklable for workers
    write: bool = True  # write entries here (False: the caller writes them, as run_ray does)
    compile_workers: int = 0  # compile each batch of configs in this many processes first (compile_pool.py)


def import_plugins(modules: Iterable[str]) -> None:
    for name in modules:
        importlib.import_module(name)


#: the dtypes the kernels' inputs come in (activations and 8-bit operands)
TUNABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)


def plan(kernels: Optional[Sequence[str]] = None, preset: str = "small",
         dtypes: Optional[Sequence[str | torch.dtype]] = None) -> list[Job]:
    """Jobs for the kernels (default: every registered one) over a preset's shapes and the dtypes
    (default: each kernel's own). ValueError naming an unknown kernel."""
    from ..kernels._tuning import registered

    reg = registered()
    names = list(kernels) if kernels else sorted(reg)
    unknown = [k for k in names if k not in reg]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; registered: {sorted(reg)}")
    wanted = [parse_dtype(d) for d in dtypes] if dtypes else None
    odd = [str(d) for d in wanted or () if d not in TUNABLE_DTYPES]
    if odd:  # a torch dtype no kernel here takes (e.g. int4): refused before any job fails on it
        raise ValueError(f"no kernel here takes dtype(s) {odd}; tunable: {[str(d) for d in TUNABLE_DTYPES]}")
    jobs = []
    for name in names:
        kernel = reg[name]
        for shape in kernel.presets.get(preset, []):
            for dtype in (wanted or kernel.dtypes):
                jobs.append(Job.make(name, dict(shape), dtype))
    return list(dict.fromkeys(jobs))  # a preset may repeat a shape


def database_for(slug: str, options: Options) -> TuningDB:
    return TuningDB(slug, user_dir=options.config_dir)


def tuning_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _summary(job: Job, status: str, **kw: Any) -> Summary:
    out: Summary = {"kernel": job.kernel, "shape": job.shape_dict, "dtype": job.dtype, "status": status,
                    "key": shape_key(job.shape_dict, token_dims_of(job.kernel)), "time_ms": None,
                    "default_time_ms": None, "speedup": None, "config": None, "measured": 0, "space": 0,
                    "reason": "", "pid": os.getpid()}
    out.update(kw)
    return out


def summary_from_entry(job: Job, entry: dict, status: str = "cached", **kw: Any) -> Summary:
    return _summary(job, status, time_ms=entry.get("time_ms"), default_time_ms=entry.get("default_time_ms"),
                    speedup=entry.get("speedup"), config=entry.get("config"), measured=entry.get("measured", 0),
                    space=entry.get("space", 0), complete=entry.get("complete", True),
                    strategy=entry.get("strategy"), search_s=entry.get("search_s"), **kw)


def run_job(job: Job, options: Options, on_trial: Optional[Callable] = None) -> Summary:
    """Tune one job here and (with options.write) store its entry; never raises for a tuning failure."""
    from ..kernels._tuning import registered
    from .tuner import tune

    try:
        import_plugins(options.imports)
        kernel = registered()[job.kernel]
        device = tuning_device()
        slug = device_slug(device)
        db = database_for(slug, options)
        if not options.retune and db.has(job.kernel, job.shape_dict, job.dtype):
            return summary_from_entry(job, db.get(job.kernel, job.shape_dict, job.dtype), slug=slug)
        now = time.time()
        if options.deadline is not None and now >= options.deadline:
            return _summary(job, "skipped", reason="out of time (--budget)", slug=slug)
        deadline = options.deadline
        if options.job_time_s is not None:
            deadline = min(deadline if deadline is not None else math.inf, now + options.job_time_s)
        prepare, batch = None, 1
        if options.compile_workers > 0:
            from .compile_pool import BATCH, shared_pool

            pool = shared_pool(options.compile_workers, options.imports)
            prepare, batch = pool.preparer(job.kernel, job.shape_dict, job.dtype, device), BATCH
        result = tune(kernel, job.shape_dict, parse_dtype(job.dtype), device, strategy=options.strategy,
                      timer=options.timer, max_measurements=options.max_measurements, deadline=deadline,
                      seed=options.seed, on_trial=on_trial, prepare=prepare, batch=batch)
        if not result.ok:
            return _summary(job, "failed", reason=result.error or "", measured=result.measured,
                            space=result.space_size, slug=slug)
        entry = result.entry()
        if options.write:
            db.put(job.kernel, job.shape_dict, job.dtype, entry)
        summary = summary_from_entry(job, entry, status="tuned", slug=slug,
                                     reason="" if result.complete else "ran out of time: partial search")
        summary["entry"] = entry
        return summary
    except Exception as e:  # a broken kernel registration must not end the whole run
        return _summary(job, "failed", reason=f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------- in this process

def run_serial(jobs: Sequence[Job], options: Options, on_result: Callable[[Summary], None],
               on_trial: Optional[Callable[[Job, Any], None]] = None) -> None:
    for job in jobs:
        trial_cb = (lambda t, j=job: on_trial(j, t)) if on_trial is not None else None
        on_result(run_job(job, options, on_trial=trial_cb))


# ----------------------------------------------------------------------------- local processes

def _worker(jobs: "mp.Queue", results: "mp.Queue", options: Options) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        results.put(run_job(job, options))


def run_pool(jobs: Sequence[Job], options: Options, workers: int, on_result: Callable[[Summary], None]) -> None:
    """Tune the jobs in `workers` spawned processes; with CUDA, worker i is pinned to GPU i."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and workers > gpus:
        raise ValueError(f"--workers {workers} but this machine has {gpus} GPU(s): one worker per GPU, so that "
                         "no two timings share a GPU")
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; spawn also gives each worker its own env
    job_q, result_q = ctx.Queue(), ctx.Queue()
    for job in jobs:
        job_q.put(job)
    procs = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible_ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    try:
        for i in range(min(workers, max(1, len(jobs)))):
            job_q.put(None)
            if gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible_ids[i]  # inherited by the spawned worker
            p = ctx.Process(target=_worker, args=(job_q, result_q, options), daemon=True)
            p.start()
            procs.append(p)
    finally:
        if gpus:
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
    pending = {job: True for job in jobs}
    try:
        while pending:
            try:
                summary = result_q.get(timeout=1.0)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    for job in list(pending):  # the workers died (killed, crashed): report, don't hang
                        on_result(_summary(job, "failed", reason="worker process died"))
                    return
                continue
            job = Job.make(summary["kernel"], summary["shape"], summary["dtype"])
            pending.pop(job, None)
            on_result(summary)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


# ----------------------------------------------------------------------------- Ray

def _import_roots(modules: Iterable[str]) -> list[str]:
    """sys.path folders holding the plugin modules (so that Ray workers can import them)."""
    roots = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        path = Path(spec.origin).resolve().parent
        for _ in name.split(".")[1:]:
            path = path.parent
        if spec.submodule_search_locations:  # a package: origin is its __init__.py
            path = path.parent
        roots.append(str(path))
    return roots


def _ray_probe() -> str:
    return device_slug(tuning_device())


def _ray_job(job: Job, options: Options) -> Summary:
    return run_job(job, options)


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--ray needs Ray, an optional extra: pip install 'tritonlab[ray]'") from e
    return ray


def run_ray(jobs: Sequence[Job], options: Options, address: str, on_result: Callable[[Summary], None],
            *, skip_done: bool = True) -> list[Summary]:
    """Tune the jobs as Ray tasks on the cluster at `address` ("local" starts one here).

    Entries come back to this process, which writes them to its database folder (options.config_dir)
    under the device slug each task reports. Returns the summaries of jobs already done (skipped).
    """
    ray = import_ray()
    env = {k: os.environ[k] for k in ("TRITON_INTERPRET", "TRITONLAB_BACKEND") if k in os.environ}
    roots = _import_roots(options.imports)
    if roots:
        env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    init_kw: dict[str, Any] = {"runtime_env": {"env_vars": env}, "ignore_reinit_error": True,
                               "log_to_driver": False}
    if address == "local":
        init_kw.update(include_dashboard=False)
        ray.init(**init_kw)
    else:
        ray.init(address=address, **init_kw)
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if not use_gpu and not interpreting():
        raise RuntimeError("the Ray cluster has no GPU; set TRITON_INTERPRET=1 to run the pipeline on CPUs")
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    probe = ray.remote(**resources)(_ray_probe)
    slug = ray.get(probe.remote())
    db = database_for(slug, options)
    done = []
    todo = []
    for job in jobs:
        if skip_done and not options.retune and db.has(job.kernel, job.shape_dict, job.dtype):
            done.append(summary_from_entry(job, db.get(job.kernel, job.shape_dict, job.dtype), slug=slug))
        else:
            todo.append(job)
    remote_job = ray.remote(**resources)(_ray_job)
    remote_options = replace(options, write=False, retune=True, config_dir=None)
    futures = {remote_job.remote(job, remote_options): job for job in todo}
    while futures:
        ready, _ = ray.wait(list(futures), num_returns=1)
        for ref in ready:
            job = futures.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as e:  # a task or its worker died
                summary = _summary(job, "failed", reason=f"Ray task failed: {type(e).__name__}: {e}")
            entry = summary.pop("entry", None)
            if summary["status"] == "tuned" and entry is not None:
                database_for(summary.get("slug") or slug, options).put(job.kernel, job.shape_dict, job.dtype, entry)
            on_result(summary)
    return done


def shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


__all__ = ["Job", "Options", "Summary", "parse_dtype", "plan", "run_job", "run_serial", "run_pool", "run_ray",
           "shutdown_ray", "database_for", "tuning_device", "summary_from_entry"]
