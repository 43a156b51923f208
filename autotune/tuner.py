"""Tune one registered kernel on one problem: prune, check, time, pick, check the winner.

`tune(kernel, shape, dtype)`:
1. takes the kernel's space for the shape and prunes, before anything compiles, the configs that
   cannot fit: block sizes that are not powers of two (tl.arange needs them), blocks larger than
   the problem (a smaller block in the space covers it), and configs whose shared-memory estimate
   exceeds the GPU's per-block limit (the kernel's own `smem_bytes(shape, config, dtype)` when it
   has one, else the usual estimate for BLOCK_M/BLOCK_N/BLOCK_K tiles times num_stages);
2. measures the heuristic default and the configs the strategy picks (search.py). Each config runs
   once first: one that fails to compile or run, or whose result's error against the float64
   reference exceeds the kernel's tolerance, is skipped and the reason recorded;
3. times with the timer: by default `triton.testing.do_bench` (median, L2 flushed between runs), with
   small inputs rotated over several copies so no run starts from a warm cache; under the
   interpreter, a wall-clock median (meaningless for speed, only so the pipeline runs on a CPU);
4. runs the winner again and checks its output against the reference before returning it.

A timer is any `timer(fn, config) -> ms` (fn runs the kernel once), so tests inject one whose winner
is known. `TuneResult.entry()` is the database entry.
"""
from __future__ import annotations

import copy
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ..kernels._backend import compile_target, shared_memory_per_block
from ..kernels._triton import HAS_TRITON, interpreting
from ..kernels._tuning import TunableKernel
from .database import config_key, new_entry
from .device import device_name
from .search import STRATEGIES, run_strategy

Timer = Callable[[Callable[[], Any], Mapping[str, Any]], float]

#: inputs smaller than this are rotated over copies when timed (about the L2 of a large GPU)
ROTATE_BELOW_BYTES = 64 * 2**20
MAX_ROTATIONS = 4
#: do_bench's warm-up and measurement windows (ms)
BENCH_WARMUP_MS = 10
BENCH_REP_MS = 40

_tls = threading.local()


def tuning_in_progress() -> bool:
    """True inside `tune` on this thread (lookups then never start another, nested, tuning run)."""
    return getattr(_tls, "depth", 0) > 0


# ----------------------------------------------------------------------------- timers

def bench_timer(fn: Callable[[], Any], config: Mapping[str, Any] | None = None) -> float:
    """Median time of fn in ms by triton.testing.do_bench (L2 flushed before each run)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, return_mode="median"))


def wall_timer(fn: Callable[[], Any], config: Mapping[str, Any] | None = None, reps: int = 3) -> float:
    """Median wall-clock time of fn in ms over a few runs (for the interpreter: says nothing about a GPU)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def default_timer(device: torch.device) -> Timer:
    return bench_timer if device.type == "cuda" else wall_timer


# ----------------------------------------------------------------------------- pruning

def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _is_pow2(v: Any) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def smem_limit(device: torch.device) -> Optional[int]:
    """Shared memory a block may opt into on this GPU (bytes), None when unknown or not a GPU; the
    target's while compiling without a GPU (offline.compile_only)."""
    if compile_target() is None and (device.type != "cuda" or interpreting() or not torch.cuda.is_available()):
        return None
    return shared_memory_per_block(device)


def smem_estimate(kernel: TunableKernel, shape: Mapping[str, int], config: Mapping[str, Any],
                  dtype: torch.dtype) -> Optional[int]:
    """Shared memory of a config in bytes: the kernel's smem_bytes if it has one, else the estimate for
    pipelined matmul tiles, num_stages * (BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * element size; None
    when neither applies."""
    own = getattr(kernel, "smem_bytes", None)
    if own is not None:
        return own(shape, config, dtype)
    if all(k in config for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")):
        elem = torch.empty((), dtype=dtype).element_size() if dtype.is_floating_point or dtype == torch.int8 else 2
        stages = max(1, int(config.get("num_stages", 2)))
        return stages * (config["BLOCK_M"] * config["BLOCK_K"] + config["BLOCK_K"] * config["BLOCK_N"]) * elem
    return None


def prune(kernel: TunableKernel, shape: Mapping[str, int], configs: list[dict], dtype: torch.dtype,
          device: torch.device) -> tuple[list[dict], dict[str, str]]:
    """(kept configs, {config key: why pruned}) -- nothing compiles here. Duplicates are dropped."""
    kept, why = [], {}
    seen = set()
    # smallest block the space offers per dim, so "larger than the problem" never empties a dim
    smallest: dict[str, int] = {}
    for c in configs:
        for k, v in c.items():
            if k.startswith("BLOCK_") and isinstance(v, int):
                smallest[k] = min(smallest.get(k, v), v)
    limit = smem_limit(device)
    for c in configs:
        key = config_key(c)
        if key in seen:
            continue
        seen.add(key)
        reason = None
        for k, v in c.items():
            if not k.startswith("BLOCK_"):
                continue
            if not _is_pow2(v):
                reason = f"{k}={v} is not a power of two (tl.arange needs one)"
                break
            dim = shape.get(k[len("BLOCK_"):])
            if dim is not None and v > max(smallest[k], _next_pow2(dim)):
                reason = f"{k}={v} is larger than the problem ({k[len('BLOCK_'):]}={dim})"
                break
        if reason is None and "num_warps" in c and not _is_pow2(c["num_warps"]):
            reason = f"num_warps={c['num_warps']} is not a power of two"
        if reason is None and limit is not None:
            need = smem_estimate(kernel, shape, c, dtype)
            if need is not None and need > limit:
                reason = f"needs ~{need} B of shared memory, the GPU allows {limit} B"
        if reason is None:
            kept.append(dict(c))
        else:
            why[key] = reason
    return kept, why


# ----------------------------------------------------------------------------- results

@dataclass
class Trial:
    """One config's outcome: time_ms when it ran correctly, else status and reason."""

    config: dict
    status: str  # "ok" | "failed" (compile/run error) | "wrong" (error above tolerance) | "pruned"
    time_ms: Optional[float] = None
    error: Optional[float] = None
    reason: str = ""


@dataclass
class TuneResult:
    kernel: str
    shape: dict
    dtype: torch.dtype
    strategy: str
    device: str
    best_config: Optional[dict] = None
    best_time_ms: Optional[float] = None
    default_config: dict = field(default_factory=dict)
    default_time_ms: Optional[float] = None
    trials: list[Trial] = field(default_factory=list)
    space_size: int = 0
    complete: bool = True
    error: Optional[str] = None  # why the whole job failed, if it did
    search_s: Optional[float] = None  # wall-clock seconds of the whole search (compiles included)

    @property
    def ok(self) -> bool:
        return self.best_config is not None

    @property
    def measured(self) -> int:
        """Configs that ran (timed or rejected), the default included."""
        return sum(1 for t in self.trials if t.status != "pruned")

    @property
    def speedup(self) -> Optional[float]:
        if not self.best_time_ms or not self.default_time_ms:
            return None
        return self.default_time_ms / self.best_time_ms

    def skipped(self) -> dict[str, str]:
        """{config key: status: reason} for every config that was pruned, failed or wrong."""
        return {config_key(t.config): f"{t.status}: {t.reason}" for t in self.trials if t.status != "ok"}

    def entry(self, max_reasons: int = 20) -> dict:
        """The database entry for this result (requires ok)."""
        if not self.ok:
            raise ValueError(f"tuning {self.kernel} {self.shape} found no config that runs correctly: {self.error}")
        skipped = self.skipped()
        return new_entry(
            config=self.best_config, time_ms=self.best_time_ms, default_config=self.default_config,
            default_time_ms=self.default_time_ms, shape=self.shape, device=self.device,
            strategy=self.strategy, space=self.space_size, measured=self.measured,
            rejected=len(skipped), reasons=dict(list(skipped.items())[:max_reasons]), complete=self.complete,
            search_s=None if self.search_s is None else round(self.search_s, 3))


# ----------------------------------------------------------------------------- tuning

def _rotations(inputs: Any) -> list[Any]:
    """The inputs and copies of them, so that small problems are timed from cold caches."""
    total = 0

    def count(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, Mapping):
            for v in obj.values():
                count(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                count(v)

    count(inputs)
    if total == 0 or total >= ROTATE_BELOW_BYTES:
        return [inputs]
    n = min(MAX_ROTATIONS, math.ceil(ROTATE_BELOW_BYTES / total))
    try:
        return [inputs] + [copy.deepcopy(inputs) for _ in range(n - 1)]
    except Exception:  # an opaque inputs object that cannot be copied: time it as it is
        return [inputs]


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".strip()


def tune(kernel: TunableKernel, shape: Mapping[str, int], dtype: torch.dtype = torch.bfloat16,
         device: Optional[torch.device | str] = None, *, strategy: str = "exhaustive",
         timer: Optional[Timer] = None, max_measurements: Optional[int] = None,
         deadline: Optional[float] = None, seed: int = 0,
         on_trial: Optional[Callable[[Trial], None]] = None,
         prepare: Optional[Callable[[list[dict]], None]] = None, batch: int = 1) -> TuneResult:
    """Tune `kernel` for one problem (see the module docstring); never raises for a bad config.

    Args:
        kernel: a registered TunableKernel.
        shape: the problem's dims; dtype: the dtype to tune for.
        device: where to run (default cuda when available, else cpu under the interpreter).
        strategy: "exhaustive" or "budgeted" (search.py); max_measurements caps either.
        timer: timer(fn, config) -> ms; default do_bench on a GPU, wall clock under the interpreter.
        deadline: a time.time() after which no new config is measured (the result is then
            marked incomplete).
        on_trial: called after each measured config (progress display).
        prepare: called with each group of configs (at most `batch`) before they are measured, e.g.
            compile_pool.CompilePool.preparer, which compiles them in parallel processes; the
            measurements themselves stay one at a time in this process. It may return
            {config_key: reason} for configs that must not run here (they faulted the GPU).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = {k: int(v) for k, v in shape.items()}
    timer = timer or default_timer(device)
    result = TuneResult(kernel=kernel.name, shape=shape, dtype=dtype, strategy=strategy, device=device_name(device))
    if not HAS_TRITON:
        result.error = "Triton is not installed"
        return result
    if device.type != "cuda" and not interpreting():
        result.error = f"no GPU: Triton kernels run on CUDA tensors, or on {device} only under TRITON_INTERPRET=1"
        return result

    _tls.depth = getattr(_tls, "depth", 0) + 1
    start = time.perf_counter()
    try:
        return _tune(kernel, shape, dtype, device, strategy, timer, max_measurements, deadline, seed, on_trial, result,
                     prepare, batch)
    finally:
        _tls.depth -= 1
        result.search_s = time.perf_counter() - start


def _tune(kernel, shape, dtype, device, strategy, timer, max_measurements, deadline, seed, on_trial, result,
          prepare=None, batch=1):
    try:
        space = [dict(c) for c in kernel.space(shape)]
        default = dict(kernel.default(shape))
    except Exception as e:
        result.error = f"space/default failed: {_why(e)}"
        return result
    result.default_config = default
    configs, pruned = prune(kernel, shape, space, dtype, device)
    result.space_size = len(space)
    for key, reason in pruned.items():
        result.trials.append(Trial(config=_config_from_key(space, key), status="pruned", reason=reason))

    try:
        inputs = kernel.make_inputs(shape, dtype, device)
    except Exception as e:
        result.error = f"make_inputs failed: {_why(e)}"
        return result
    tolerance = float(kernel.tolerance(dtype))
    sets = _rotations(inputs)
    verified: list[tuple[torch.Tensor, float]] = []  # outputs already checked against the reference
    trials: dict[str, Trial] = {}

    def check(out: Any) -> float:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"run returned {type(out).__name__}, not a tensor")
        for ref_out, err in verified:  # a bit-identical output has the same error: skip the reference
            if ref_out.shape == out.shape and ref_out.dtype == out.dtype and torch.equal(ref_out, out):
                return err
        err = float(kernel.error(inputs, out))
        if len(verified) < 4:
            verified.append((out.detach().clone(), err))
        return err

    def measure(cfg: dict) -> Trial:
        key = config_key(cfg)
        if key in trials:
            return trials[key]
        trial = Trial(config=dict(cfg), status="ok")
        try:
            out = kernel.run(inputs, cfg)  # compiles; the first run is also the correctness check
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            err = check(out)
            trial.error = err
            if not (err <= tolerance):  # NaN fails too
                trial.status, trial.reason = "wrong", f"error {err:.3g} > tolerance {tolerance:.3g}"
            else:
                state = {"i": 0}

                def fn() -> Any:
                    state["i"] = (state["i"] + 1) % len(sets)
                    return kernel.run(sets[state["i"]], cfg)

                trial.time_ms = float(timer(fn, dict(cfg)))
                if not math.isfinite(trial.time_ms) or trial.time_ms <= 0:
                    trial.status, trial.reason, trial.time_ms = "failed", f"timer gave {trial.time_ms}", None
        except Exception as e:  # compile errors, out of resources, launch failures: skip the config
            trial.status, trial.reason = "failed", _why(e)
        trials[key] = trial
        result.trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        return trial

    out_of_time = []

    def stop() -> bool:  # asked only before a measurement that would otherwise happen
        if deadline is not None and time.time() >= deadline:
            out_of_time.append(True)
            return True
        return False

    def prepare_new(group: list[dict]) -> None:
        fresh = [c for c in group if config_key(c) not in trials]
        if prepare is None or not fresh:
            return
        try:
            faulted = prepare(fresh) or {}
        except Exception:  # preparing only saves time: the measurements compile what it missed
            return
        for cfg in fresh:  # a config that faulted the GPU elsewhere is not run here (it would poison this context)
            reason = faulted.get(config_key(cfg))
            if reason:
                trial = Trial(config=dict(cfg), status="failed", reason=f"faulted the GPU in a compile worker: {reason}")
                trials[config_key(cfg)] = trial
                result.trials.append(trial)
                if on_trial is not None:
                    on_trial(trial)

    d = measure(default)
    result.default_time_ms = d.time_ms
    run_strategy(strategy, configs, lambda c: measure(c).time_ms, max_measurements=max_measurements,
                 start=[default], seed=seed, should_stop=stop, prepare=prepare_new if prepare else None,
                 batch=batch)
    result.complete = not out_of_time

    # The winner: the fastest correct config (the default competes too); re-checked before it is returned.
    ranked = sorted((t for t in trials.values() if t.status == "ok"), key=lambda t: t.time_ms)
    for t in ranked:
        try:
            out = kernel.run(inputs, t.config)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            err = float(kernel.error(inputs, out))
        except Exception as e:
            t.status, t.reason, t.time_ms = "failed", f"winner re-check: {_why(e)}", None
            continue
        if not (err <= tolerance):
            t.status, t.reason, t.time_ms = "wrong", f"winner re-check: error {err:.3g} > {tolerance:.3g}", None
            continue
        result.best_config, result.best_time_ms = dict(t.config), t.time_ms
        break
    if result.best_config is None:
        reasons = sorted({t.reason for t in trials.values() if t.status != "ok"})
        result.error = "no config ran correctly" + (f" ({'; '.join(reasons[:3])})" if reasons else "")
    return result


def _config_from_key(configs: list[dict], key: str) -> dict:
    return next((dict(c) for c in configs if config_key(c) == key), {})
