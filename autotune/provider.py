"""The config provider the kernels' `lookup_config` calls: the tuning database, cached.

The first lookup of a (kernel, shape, dtype, device) reads the device's database (once per device)
and applies the lookup rule (database.py); the answer, found or not, is cached, so later calls do no
file I/O: a dict lookup on a small key. `reset()` drops the caches (after the files change, or
TRITONLAB_CONFIG_DIR does).

With TRITONLAB_AUTOTUNE=1 a lookup whose exact bucket is missing tunes that problem on the spot
(the budgeted strategy, or TRITONLAB_AUTOTUNE_STRATEGY), stores the entry and uses it. Never while
another tuning run is in progress on the thread, inside torch.compile tracing, or during CUDA graph
capture; a failure there is a warning and the heuristic default runs.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Any, Mapping, Optional

import torch

from ..kernels import _tuning
from .database import TuningDB
from .device import device_slug

_CACHE: dict[tuple, Optional[dict]] = {}
_DBS: dict[str, TuningDB] = {}
_SLUGS: dict[tuple[str, Optional[int]], str] = {}
_TUNE_LOCK = threading.Lock()
#: counts of cache misses served (tests use it to see that the hot path does no work)
stats = {"misses": 0, "tuned": 0}


def reset() -> None:
    """Forget every cached answer and database (re-read the files on the next lookup)."""
    _CACHE.clear()
    _DBS.clear()
    _SLUGS.clear()


def database(slug: Optional[str] = None, device: Optional[torch.device] = None) -> TuningDB:
    """The (cached) database of a device slug, by default this machine's GPU (or "cpu")."""
    slug = slug or _slug(device)
    db = _DBS.get(slug)
    if db is None:
        db = _DBS[slug] = TuningDB(slug)
    return db


def _slug(device: Optional[torch.device]) -> str:
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    key = (device.type, device.index)
    slug = _SLUGS.get(key)
    if slug is None:
        slug = _SLUGS[key] = device_slug(device)
    return slug


def _may_tune_now(device: torch.device) -> bool:
    from .tuner import tuning_in_progress

    if os.environ.get("TRITONLAB_AUTOTUNE", "0") != "1" or tuning_in_progress():
        return False
    try:
        if torch.compiler.is_compiling():
            return False
    except AttributeError:  # pragma: no cover - older torch
        pass
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _tune_now(kernel: _tuning.TunableKernel, shape: Mapping[str, int], dtype: torch.dtype,
              device: torch.device, db: TuningDB) -> Optional[dict]:
    from .tuner import tune

    strategy = os.environ.get("TRITONLAB_AUTOTUNE_STRATEGY", "budgeted")
    with _TUNE_LOCK:
        try:
            result = tune(kernel, shape, dtype, device, strategy=strategy)
            if not result.ok:
                warnings.warn(f"TRITONLAB_AUTOTUNE: tuning {kernel.name} {dict(shape)} failed ({result.error}); "
                              "using the heuristic default", RuntimeWarning, stacklevel=4)
                return None
            stats["tuned"] += 1
            try:
                db.put(kernel.name, shape, dtype, result.entry())
                _CACHE.clear()  # a new entry can change the nearest bucket of other problems
            except Exception as e:  # a read-only or full config folder: the winner still serves this process
                warnings.warn(f"TRITONLAB_AUTOTUNE: could not store the tuned {kernel.name} {dict(shape)} entry in "
                              f"{db.user_file.path} ({type(e).__name__}: {e}); using it in this process only",
                              RuntimeWarning, stacklevel=4)
            return dict(result.best_config)
        except Exception as e:  # never break a model's forward pass over tuning
            warnings.warn(f"TRITONLAB_AUTOTUNE: tuning {kernel.name} {dict(shape)} raised {type(e).__name__}: {e}; "
                          "using the heuristic default", RuntimeWarning, stacklevel=4)
            return None


def _usable(config: Mapping[str, Any]) -> bool:
    """Whether a stored config can be handed to a launcher: every value a non-negative int (tuning
    spaces hold only ints and flags), num_warps a power of two up to 32, num_stages >= 1. A
    hand-edited entry breaking this would fail every launch of its kernel."""
    if not all(isinstance(v, int) and v >= 0 for v in config.values()):
        return False
    warps, stages = config.get("num_warps", 4), config.get("num_stages", 1)
    return warps in (1, 2, 4, 8, 16, 32) and stages >= 1


def config_provider(name: str, shape: Mapping[str, int], dtype: torch.dtype,
                    device: torch.device) -> Optional[dict[str, Any]]:
    """The tuned config for a problem by the database's lookup rule, or None (then the default runs)."""
    key = (name, tuple(sorted(shape.items())), dtype, device.type, device.index)
    try:
        return _CACHE[key]
    except KeyError:
        pass
    stats["misses"] += 1
    db = database(device=device)
    kernel = _tuning._REGISTRY.get(name)
    config, how = db.lookup(name, shape, dtype, space=kernel.space if kernel is not None else None)
    if config is not None and not _usable(config):
        warnings.warn(f"tuning database {db.slug}: the {name} entry for {dict(shape)} ({dtype}) has an unusable config "
                      f"{config}; the default config runs", RuntimeWarning, stacklevel=2)
        config, how = None, "none"
    if how != "exact" and kernel is not None and _may_tune_now(device):
        config = _tune_now(kernel, shape, dtype, device, db) or config
    _CACHE[key] = config
    return config


def install() -> None:
    """Make the kernels' lookup_config ask the tuning database."""
    _tuning.set_config_provider(config_provider)
