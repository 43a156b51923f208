"""Compile configs ahead of their measurement, in parallel worker processes.

Most of a tuning run's time goes to compiling configs (seconds each on a GPU box), not to timing
them (a fraction of a second). A `CompilePool` keeps N spawned processes on this machine;
`preparer(...)` gives the tuner a `prepare(configs)` callback (tuner.tune's `prepare`): each config
runs once in a worker, which leaves its compiled kernel in Triton's on-disk cache, so the tuner's
own first run of it loads the binary instead of compiling. `prepare` returns when the whole batch
is done: the workers' runs never overlap the tuner's timings on the GPU.

A compiled kernel's cache key includes its argument specialization (dtypes, 16-byte alignment,
divisibility by 16 of integer arguments), so a worker builds inputs exactly as the tuner does, with
the kernel's own `make_inputs` for the same shape and dtype (kept for the next config of the job).
Preparing only saves time: a worker that fails, dies or times out changes no result; the tuner then
compiles in its own process as it would without a pool. One exception: a config that faults the
GPU in a worker (an illegal address, a launch failure) is reported back, and the tuner records it
as failed without running it, because the same fault in the tuner's process would poison its CUDA
context for every later measurement. That worker then exits, and the pool is started afresh.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

#: a batch that takes longer than this is abandoned (the tuner compiles what is left)
BATCH_TIMEOUT_S = 900
#: GPU memory to leave per worker (its CUDA context plus one job's inputs, e.g. 1.9 GB of Mixtral weights)
GPU_BYTES_PER_WORKER = 4 * 2**30
#: configs per prepared batch whatever the worker count, so that a seeded budgeted search takes the
#: same path on every machine
BATCH = 8
#: error texts of a CUDA fault, after which a process's CUDA context is unusable
CUDA_FAULTS = ("illegal memory access", "illegal address", "misaligned address", "unspecified launch failure",
               "an illegal instruction", "device-side assert", "CUDA error")

_inputs: dict[tuple, Any] = {}  # in a worker: the inputs of the job it last prepared
_faulted = False  # in a worker: a config faulted the GPU; the next task ends the process


def is_cuda_fault(reason: Optional[str]) -> bool:
    return reason is not None and any(f in reason for f in CUDA_FAULTS)


def _init_worker(imports: tuple[str, ...]) -> None:
    from .runner import import_plugins

    import_plugins(imports)


def _run_configs(kernel_name: str, shape: dict, dtype: str, device: str, configs: list[dict]) -> list[Optional[str]]:
    """In a worker: run each config once (compiling it); None per config that ran, else why it did not."""
    global _faulted
    from ..kernels._tuning import registered
    from .runner import parse_dtype

    if _faulted:  # this process's CUDA context is gone: end it, the pool starts afresh
        os._exit(1)
    dev = torch.device(device)
    key = (kernel_name, tuple(sorted(shape.items())), dtype, device)
    kernel = registered()[kernel_name]
    if key not in _inputs:
        _inputs.clear()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        _inputs[key] = kernel.make_inputs(shape, parse_dtype(dtype), dev)
    outcome: list[Optional[str]] = []
    for cfg in configs:
        try:
            kernel.run(_inputs[key], dict(cfg))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            outcome.append(None)
        except Exception as e:  # the tuner records the real failure when it measures this config
            outcome.append(f"{type(e).__name__}: {str(e).strip()[:200]}")
            if is_cuda_fault(outcome[-1]):
                _faulted = True
                outcome += ["skipped: the worker's CUDA context faulted"] * (len(configs) - len(outcome))
                break
    return outcome


def default_workers(device: torch.device) -> int:
    """Compile workers worth starting here: 0 without a GPU (the interpreter compiles nothing), else
    up to 8, leaving two cores to this process and bounded by free GPU memory."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    cores = max(0, (os.cpu_count() or 1) - 2)
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, min(8, cores, free // GPU_BYTES_PER_WORKER))


class CompilePool:
    """N spawned worker processes that run configs ahead of the tuner's measurements (module docstring)."""

    def __init__(self, workers: int, imports: Sequence[str] = ()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: Optional[ProcessPoolExecutor] = ProcessPoolExecutor(
            max_workers=workers, mp_context=mp.get_context("spawn"),  # CUDA cannot be forked
            initializer=_init_worker, initargs=(tuple(imports),))
        self.ran = 0  # configs the workers ran
        self.failed = 0  # configs that failed in a worker (the tuner then records why)
        self.broken: Optional[str] = None  # why the pool stopped preparing, if it did

    def run(self, kernel_name: str, shape: Mapping[str, int], dtype: str, device: str,
            configs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """Run every config once across the workers; returns when all are done (or on timeout), with
        {config_key: reason} for the configs that faulted the GPU (never to be run in this process)."""
        from .database import config_key

        if self._pool is None or not configs:
            return {}
        try:
            futures = {self._pool.submit(_run_configs, kernel_name, dict(shape), dtype, device, [dict(c)]): config_key(c)
                       for c in configs}
        except Exception as e:  # a worker died earlier (BrokenProcessPool): stop preparing
            self._give_up(f"{type(e).__name__}: {e}")
            return {}
        done, pending = wait(futures, timeout=BATCH_TIMEOUT_S)
        for f in pending:
            f.cancel()
        faults: dict[str, str] = {}
        for f in done:
            try:
                outcome = f.result()
            except Exception as e:  # the worker process died (a faulted one ending itself, or a crash)
                self._give_up(f"{type(e).__name__}: {e}")
                continue
            self.ran += sum(o is None for o in outcome)
            self.failed += sum(o is not None for o in outcome)
            if is_cuda_fault(outcome[0]):
                faults[futures[f]] = outcome[0]
        return faults

    def preparer(self, kernel_name: str, shape: Mapping[str, int], dtype: str,
                 device: torch.device | str) -> Callable[[list[dict]], dict[str, str]]:
        """The `prepare` callback of tuner.tune for one job."""
        return lambda configs: self.run(kernel_name, shape, dtype, str(device), configs)

    def _give_up(self, why: str) -> None:
        self.broken = why
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            processes = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            for proc in processes:  # a worker stuck in a hung kernel must not hang this process's exit
                if proc.is_alive():
                    proc.terminate()


_shared: dict[tuple, CompilePool] = {}


def shared_pool(workers: int, imports: Sequence[str] = ()) -> CompilePool:
    """One pool per process and setting, kept across jobs (starting workers costs seconds each)."""
    key = (workers, tuple(imports))
    pool = _shared.get(key)
    if pool is None or pool.broken is not None:
        pool = _shared[key] = CompilePool(workers, imports)
    return pool


@atexit.register
def _close_all() -> None:
    for pool in _shared.values():
        pool.close()
