"""The autotuner: tuning database, lookup rule, provider cache, search strategies, tuner, CLI, scale-out.

Runs on the CPU: the tree_route kernel through the Triton interpreter (tiny spaces, an injected timer
so the winner is known), and synthetic kernels (pure torch) where a test is about the pipeline,
not a kernel. Processes: two writers at once, a run killed mid-way and resumed, a worker pool, Ray
(skipped when Ray is not installed: it is the optional extra tritonlab[ray]).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritonlab.autotune import database as dbm
from tritonlab.autotune import provider, runner, search, tuner
from tritonlab.autotune.cli import main as autotune_main
from tritonlab.autotune.database import TuningDB, TuningFile, new_entry, shape_key
from tritonlab.autotune.device import device_slug
from tritonlab.kernels import _tuning
from tritonlab.kernels._accuracy import rel_error
from tritonlab.kernels.tree_routing import reference as tree_ref

GPU = torch.cuda.is_available()
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture
def cpu_pipeline(monkeypatch):
    """Tuning on CPU tensors needs the interpreter flag (also on a GPU machine: these kernels are pure torch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A private user folder (TRITONLAB_CONFIG_DIR) and shipped folder; provider caches dropped."""
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setenv("TRITONLAB_CONFIG_DIR", str(user))
    monkeypatch.setattr(dbm, "shipped_config_dir", lambda: shipped)
    monkeypatch.delenv("TRITONLAB_AUTOTUNE", raising=False)
    provider.reset()
    yield user, shipped
    provider.reset()


def _entry(config, time_ms=1.0, shape=None, **kw):
    return new_entry(config=config, time_ms=time_ms, default_config={"B": 16}, default_time_ms=2.0 * time_ms,
                     shape=shape or {"T": 1, "D": 1}, device="test", **kw)


def _double_kernel(name="fake_double", configs=None, bad=(), broken=(), calls=None):
    """A pure-torch tunable kernel y = 2x: configs in `bad` give a wrong result, in `broken` raise."""
    configs = configs or [{"B": b, "W": w} for b in (16, 32, 64) for w in (2, 4)]

    def run(inp, cfg):
        if calls is not None:
            calls.append(dict(cfg))
        if cfg in broken:
            raise RuntimeError("boom: cannot compile")
        return inp["x"] * (3 if cfg in bad else 2)

    return _tuning.TunableKernel(
        name=name, default=lambda s: {"B": 16, "W": 4}, space=lambda s: [dict(c) for c in configs],
        make_inputs=lambda s, dt, dev: {"x": torch.randn(s["T"], s["D"], dtype=dt, device=dev)},
        run=run, error=lambda inp, out: rel_error(out, 2 * inp["x"].double().cpu().numpy()),
        tolerance=lambda dt: 1e-6, presets={"small": [{"T": 5, "D": 7}]}, dtypes=(torch.float32,))


PLUGIN = '''
"""Test plugin: a synthetic tunable kernel whose configs sleep S * 4 ms (no Triton needed)."""
import time
import torch
from tritonlab.kernels._accuracy import rel_error
from tritonlab.kernels._tuning import TunableKernel, register

MADE = []  # shapes whose inputs were built, i.e. jobs that were tuned in this process

def _inputs(shape, dtype, device):
    MADE.append(dict(shape))
    return {"x": torch.randn(shape["T"], shape["D"], dtype=dtype, device=device)}

def _run(inp, cfg):
    time.sleep(0.004 * cfg["S"])
    return inp["x"] * 2

register(TunableKernel(
    name="fake_sleep", default=lambda s: {"S": 3}, space=lambda s: [{"S": v} for v in (1, 2, 3, 4)],
    make_inputs=_inputs, run=_run, error=lambda inp, out: rel_error(out, 2 * inp["x"].double().cpu().numpy()),
    tolerance=lambda dt: 1e-6, dtypes=(torch.float32,),
    presets={"small": [{"T": t, "D": 8} for t in (2, 8, 32, 100, 300, 1000)]}))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin module, importable here, in spawned workers and in subprocesses."""
    name = f"tl_autotune_plugin_{os.getpid()}_{random.randrange(10**9)}"
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    yield name
    _tuning._REGISTRY.pop("fake_sleep", None)
    sys.modules.pop(name, None)


def _count(path: Path) -> int:
    return dbm.entry_count(json.loads(path.read_text())) if path.exists() else 0


def _slug() -> str:
    return device_slug(runner.tuning_device())


# ----------------------------------------------------------------------------- shape keys and the lookup rule

def test_shape_key_buckets_token_dims_only():
    assert [dbm.token_bucket(n) for n in (0, 1, 2, 3, 64, 65, 100, 4096)] == [1, 1, 2, 4, 64, 128, 128, 4096]
    assert shape_key({"T": 100, "D": 768, "depth": 8}) == "D=768,T=128,depth=8"
    assert shape_key({"M": 37, "N": 100, "K": 72}) == "K=72,M=64,N=100"
    assert dbm.parse_shape_key("D=768,T=128,depth=8") == {"D": 768, "T": 128, "depth": 8}
    assert dbm.is_decode(64) and dbm.is_decode(1) and not dbm.is_decode(65)


def test_lookup_exact_then_nearest_never_decode_for_prefill(dirs):
    user, shipped = dirs
    db = TuningDB("gpu_test")
    a, b, c = {"B": 1}, {"B": 2}, {"B": 3}
    db.put("k", {"T": 16, "D": 768}, torch.float16, _entry(a, shape={"T": 16, "D": 768}))
    db.put("k", {"T": 4096, "D": 768}, torch.float16, _entry(b, shape={"T": 4096, "D": 768}))
    fresh = TuningDB("gpu_test")  # from disk
    assert fresh.lookup("k", {"T": 16, "D": 768}, torch.float16) == (a, "exact")
    assert fresh.lookup("k", {"T": 11, "D": 768}, torch.float16) == (a, "exact")  # same bucket (16)
    assert fresh.lookup("k", {"T": 1, "D": 768}, torch.float16) == (a, "nearest")
    # T=100 (bucket 128) is 3 octaves from the decode entry and 5 from the prefill one: prefill wins
    assert fresh.lookup("k", {"T": 100, "D": 768}, torch.float16) == (b, "nearest")
    assert fresh.lookup("k", {"T": 65, "D": 768}, torch.float16) == (b, "nearest")
    assert fresh.lookup("k", {"T": 64, "D": 768}, torch.float16) == (a, "nearest")
    # other dims: within a factor of 2, else nothing; another dtype or kernel: nothing
    assert fresh.lookup("k", {"T": 4096, "D": 1024}, torch.float16) == (b, "nearest")
    assert fresh.lookup("k", {"T": 4096, "D": 4096}, torch.float16) == (None, "none")
    assert fresh.lookup("k", {"T": 4096, "D": 768}, torch.bfloat16) == (None, "none")
    assert fresh.lookup("other", {"T": 4096, "D": 768}, torch.float16) == (None, "none")
    # nearest prefers closer buckets
    db.put("k", {"T": 1024, "D": 768}, torch.float16, _entry(c, shape={"T": 1024, "D": 768}))
    assert db.lookup("k", {"T": 300, "D": 768}, torch.float16) == (c, "nearest")
    # a space that does not offer the config for this shape vets it out: the next candidate serves
    assert db.lookup("k", {"T": 300, "D": 768}, torch.float16, space=lambda s: [b]) == (b, "nearest")
    assert db.lookup("k", {"T": 300, "D": 768}, torch.float16, space=lambda s: [{"B": 9}]) == (None, "none")


def test_lookup_small_dims_are_structural(dirs):
    db = TuningDB("gpu_test")
    db.put("k", {"T": 4096, "D": 768, "depth": 8}, torch.float16, _entry({"B": 1}, shape={"T": 4096, "D": 768, "depth": 8}))
    assert db.lookup("k", {"T": 2048, "D": 768, "depth": 8}, torch.float16)[1] == "nearest"
    assert db.lookup("k", {"T": 4096, "D": 768, "depth": 6}, torch.float16) == (None, "none")
    assert db.lookup("k", {"T": 4096, "D": 768}, torch.float16) == (None, "none")  # other dim names


def test_prefill_problem_with_only_decode_entries_gets_the_default(dirs, monkeypatch):
    kernel = _double_kernel("fake_decode_only")
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    TuningDB("gpu_test").put(kernel.name, {"T": 8, "D": 7}, torch.float32, _entry({"B": 64, "W": 2}, shape={"T": 8, "D": 7}))
    monkeypatch.setitem(provider._SLUGS, ("cuda", 0), "gpu_test")  # pretend cuda:0 is the "gpu_test" device
    dev = torch.device("cuda", 0)
    assert _tuning.lookup_config(kernel.name, {"T": 8, "D": 7}, torch.float32, dev) == {"B": 64, "W": 2}
    assert _tuning.lookup_config(kernel.name, {"T": 2, "D": 7}, torch.float32, dev) == {"B": 64, "W": 2}
    assert _tuning.lookup_config(kernel.name, {"T": 200, "D": 7}, torch.float32, dev) == {"B": 16, "W": 4}
    assert _tuning.lookup_config(kernel.name, {"T": 8, "D": 7}, torch.float16, dev) == {"B": 16, "W": 4}


# ----------------------------------------------------------------------------- files

def test_round_trip_records_times_versions_and_date(dirs):
    user, _ = dirs
    db = TuningDB("gpu_test")
    entry = _entry({"B": 32, "W": 4}, time_ms=0.25, shape={"T": 100, "D": 768}, strategy="exhaustive")
    key = db.put("k", {"T": 100, "D": 768}, torch.bfloat16, entry)
    assert key == "D=768,T=128"
    data = json.loads((user / "gpu_test.json").read_text())
    stored = data["kernels"]["k"]["bfloat16"][key]
    assert data["format"] == dbm.FORMAT_VERSION and data["slug"] == "gpu_test"
    assert stored["config"] == {"B": 32, "W": 4} and stored["time_ms"] == 0.25 and stored["default_time_ms"] == 0.5
    assert stored["speedup"] == 2.0 and stored["shape"] == {"T": 100, "D": 768}
    for field in ("triton", "torch", "date", "default_config", "complete"):
        assert field in stored
    again = TuningDB("gpu_test")
    assert again.get("k", {"T": 128, "D": 768}, torch.bfloat16) == stored
    assert again.has("k", {"T": 100, "D": 768}, "bfloat16")
    assert not again.has("k", {"T": 100, "D": 768}, "float16")


def test_shipped_entries_are_in_their_kernels_spaces():
    """A lookup at exactly a tuned shape serves the stored config without checking it against the
    kernel's current space (only borrowed entries are checked), so every shipped entry must stay in
    its kernel's space: a space change that orphans one fails here (re-tune, or keep the config)."""
    files = sorted(dbm.shipped_config_dir().glob("*.json"))
    assert files, "no shipped tuning database"
    kernels = _tuning.registered()
    checked = 0
    for path in files:
        for kernel, dtype, key, entry in dbm.iter_entries(json.loads(path.read_text())):
            k = kernels[kernel]
            shape = {n: int(v) for n, v in (entry.get("shape") or dbm.parse_shape_key(key)).items()}
            merged = [dict(k.default(shape), **c) for c in k.space(shape)]
            assert dict(k.default(shape), **entry["config"]) in merged, (path.name, kernel, dtype, key, entry["config"])
            checked += 1
    assert checked > 0


def test_user_folder_overrides_shipped(dirs, monkeypatch, tmp_path):
    user, shipped = dirs
    assert dbm.user_config_dir() == user
    monkeypatch.delenv("TRITONLAB_CONFIG_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dbm.user_config_dir() == tmp_path / "xdg" / "tritonlab" / "configs"
    monkeypatch.setenv("TRITONLAB_CONFIG_DIR", str(user))
    TuningFile(shipped / "gpu_test.json").put("k", "float16", "D=8,T=128", _entry({"B": 1}, shape={"T": 128, "D": 8}))
    TuningFile(shipped / "gpu_test.json").put("k", "float16", "D=8,T=1024", _entry({"B": 5}, shape={"T": 1024, "D": 8}))
    TuningFile(user / "gpu_test.json").put("k", "float16", "D=8,T=128", _entry({"B": 2}, shape={"T": 128, "D": 8}))
    db = TuningDB("gpu_test")
    assert db.lookup("k", {"T": 128, "D": 8}, torch.float16) == ({"B": 2}, "exact")
    assert db.lookup("k", {"T": 1024, "D": 8}, torch.float16) == ({"B": 5}, "exact")
    sources = {key: src for _, _, key, _, src in db.entries()}
    assert sources == {"D=8,T=128": "user", "D=8,T=1024": "shipped"}


@pytest.mark.parametrize("garbage", [
    '{"kernels": {"k": ', "[1, 2, 3]", '{"kernels": {"k": {"float16": {"T=1": 5}}}}',
    # structures every later lookup would trip over (found by fuzzing): a non-integer format, an
    # entry shape that is not a dict of ints
    '{"format": "1", "kernels": {}}', '{"format": null, "kernels": {}}',
    '{"kernels": {"k": {"float16": {"T=4": {"config": {}, "shape": [1, 2]}}}}}',
    '{"kernels": {"k": {"float16": {"T=4": {"config": {}, "shape": {"T": "x"}}}}}}'])
def test_corrupted_file_is_reported_and_set_aside(dirs, garbage):
    user, _ = dirs
    path = user / "gpu_test.json"
    path.write_text(garbage)
    db = TuningDB("gpu_test")
    with pytest.warns(RuntimeWarning, match="corrupted"):
        assert db.lookup("k", {"T": 4, "D": 8}, torch.float16) == (None, "none")
    aside = list(user.glob("gpu_test.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == garbage and not path.exists()
    db.put("k", {"T": 4, "D": 8}, torch.float16, _entry({"B": 3}))
    assert TuningDB("gpu_test").lookup("k", {"T": 4, "D": 8}, torch.float16) == ({"B": 3}, "exact")


def test_keep_faster_agrees_with_a_reload(dirs):
    """put(keep="faster") against a faster shipped entry writes nothing, so a reload (user file over
    shipped) still finds the shipped one (found by fuzzing: the slower user entry won after reload)."""
    user, shipped = dirs
    TuningFile(shipped / "gpu_test.json").put("k", "float16", "D=8,T=128", _entry({"B": 1}, time_ms=1.0))
    db = TuningDB("gpu_test")
    db.put("k", {"T": 128, "D": 8}, torch.float16, _entry({"B": 2}, time_ms=2.0), keep="faster")
    assert db.lookup("k", {"T": 128, "D": 8}, torch.float16) == ({"B": 1}, "exact")
    db.reload()
    assert db.lookup("k", {"T": 128, "D": 8}, torch.float16) == ({"B": 1}, "exact")
    db.put("k", {"T": 128, "D": 8}, torch.float16, _entry({"B": 3}, time_ms=0.5), keep="faster")
    db.reload()
    assert db.lookup("k", {"T": 128, "D": 8}, torch.float16) == ({"B": 3}, "exact")


def test_newer_format_file_is_ignored_not_set_aside(dirs):
    """A database written by a newer tritonlab is reported and ignored, and left as it is (it was set
    aside as corrupted, i.e. renamed); writing to it is refused rather than downgrading it."""
    user, _ = dirs
    path = user / "gpu_test.json"
    text = json.dumps({"format": dbm.FORMAT_VERSION + 1, "kernels": {"k": {"float16": {"T=4": {"config": {"B": 1}}}}}})
    path.write_text(text)
    with pytest.warns(RuntimeWarning, match="newer"):
        assert TuningDB("gpu_test").lookup("k", {"T": 4}, torch.float16) == (None, "none")
    with pytest.raises(RuntimeError, match="not writing"):
        TuningFile(path).put("k", "float16", "T=4", _entry({"B": 2}))
    assert path.read_text() == text and not list(user.glob("gpu_test.json.corrupt-*"))


def test_lookup_skips_keys_that_are_not_shapes(dirs):
    """A hand-edited key that is not name=int pairs matches no problem; the lookup goes on (it raised)."""
    user, _ = dirs
    for key in ("garbage", "D=8,T=abc"):
        TuningFile(user / "gpu_test.json").put("k", "float16", key, _entry({"B": 9}))
    db = TuningDB("gpu_test")
    assert db.lookup("k", {"T": 4, "D": 8}, torch.float16) == (None, "none")
    db.put("k", {"T": 4, "D": 8}, torch.float16, _entry({"B": 3}))
    assert db.lookup("k", {"T": 8, "D": 8}, torch.float16) == ({"B": 3}, "nearest")


def test_merge_keeps_the_faster_winner(tmp_path):
    a, b, dest = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out" / "gpu.json"
    TuningFile(a).put("k", "float16", "T=1", _entry({"B": 1}, time_ms=1.0))
    TuningFile(a).put("k", "float16", "T=2", _entry({"B": 1}, time_ms=3.0))
    TuningFile(a).put("k", "float16", "T=4", _entry({"B": 1}, time_ms=1.0))
    TuningFile(b).put("k", "float16", "T=1", _entry({"B": 2}, time_ms=2.0))
    TuningFile(b).put("k", "float16", "T=2", _entry({"B": 2}, time_ms=0.5))
    TuningFile(b).put("j", "bfloat16", "T=8", _entry({"B": 2}, time_ms=0.5))
    TuningFile(dest).put("k", "float16", "T=4", _entry({"B": 3}, time_ms=0.1))
    counts = dbm.merge_files([a, b], dest)
    got = {(k, d, key): e["config"]["B"] for k, d, key, e in dbm.iter_entries(TuningFile(dest).load())}
    assert got == {("k", "float16", "T=1"): 1, ("k", "float16", "T=2"): 2, ("k", "float16", "T=4"): 3,
                   ("j", "bfloat16", "T=8"): 2}
    assert counts == {"added": 3, "replaced": 1, "kept": 2}


def _write_many(path: str, tag: str, n: int, barrier) -> None:
    barrier.wait()
    f = TuningFile(path)
    for i in range(n):
        f.put("k", "float16", f"T={i},W={tag}", _entry({"B": i}, time_ms=1.0 + i))


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "gpu.json")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(path, tag, 25, barrier)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    data = TuningFile(path).load()
    keys = {key for _, _, key, _ in dbm.iter_entries(data)}
    assert keys == {f"T={i},W={t}" for i in range(25) for t in "ab"}
    assert not list(tmp_path.glob(".gpu.json.*.tmp"))  # no temporary file left behind


# ----------------------------------------------------------------------------- the provider

def test_provider_refuses_an_unusable_stored_config(dirs, monkeypatch):
    """A hand-edited exact entry with values no launcher takes (found by fuzzing: they reached the
    launcher) is reported once and the default runs; a usable one is returned."""
    kernel = _double_kernel("fake_unusable")
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    cpu = torch.device("cpu")
    for i, bad in enumerate(({"B": "abc"}, {"B": 64, "num_warps": -1}, {"B": 64, "num_warps": 3}, {"B": 1.5})):
        shape = {"T": 5 + 100 * i, "D": 7}
        TuningDB("cpu").put(kernel.name, shape, torch.float32, _entry(bad, shape=shape))
        provider.reset()
        with pytest.warns(RuntimeWarning, match="unusable config"):
            assert provider.config_provider(kernel.name, shape, torch.float32, cpu) is None
    good = {"T": 1000, "D": 7}
    TuningDB("cpu").put(kernel.name, good, torch.float32, _entry({"B": 64, "num_warps": 8}, shape=good))
    provider.reset()
    assert provider.config_provider(kernel.name, good, torch.float32, cpu) == {"B": 64, "num_warps": 8}


def test_provider_is_cached_no_file_io_after_first_call(dirs, monkeypatch):
    kernel = _double_kernel("fake_cached")
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    TuningDB("cpu").put(kernel.name, {"T": 5, "D": 7}, torch.float32, _entry({"B": 64, "W": 2}, shape={"T": 5, "D": 7}))
    cpu = torch.device("cpu")
    assert provider.config_provider(kernel.name, {"T": 5, "D": 7}, torch.float32, cpu) == {"B": 64, "W": 2}
    assert provider.config_provider(kernel.name, {"T": 9999, "D": 7}, torch.float32, cpu) is None  # a miss

    def no_io(*a, **k):
        raise AssertionError("file I/O on the hot path")

    monkeypatch.setattr(TuningFile, "_read", no_io)
    monkeypatch.setattr(TuningFile, "load", no_io)
    misses = provider.stats["misses"]
    for _ in range(200):
        assert provider.config_provider(kernel.name, {"T": 5, "D": 7}, torch.float32, cpu) == {"B": 64, "W": 2}
        assert provider.config_provider(kernel.name, {"T": 9999, "D": 7}, torch.float32, cpu) is None
    assert provider.stats["misses"] == misses
    assert _tuning._provider is provider.config_provider  # installed by importing tritonlab.autotune


def test_autotune_env_tunes_missing_entries_on_the_fly(dirs, monkeypatch, cpu_pipeline):
    calls = []
    kernel = _double_kernel("fake_onthefly", bad=[{"B": 64, "W": 2}], calls=calls)
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    cpu = torch.device("cpu")
    shape = {"T": 6, "D": 7}
    assert provider.config_provider(kernel.name, shape, torch.float32, cpu) is None
    assert not calls and TuningDB("cpu").get(kernel.name, shape, torch.float32) is None
    monkeypatch.setenv("TRITONLAB_AUTOTUNE", "1")
    provider.reset()
    got = provider.config_provider(kernel.name, shape, torch.float32, cpu)
    stored = TuningDB("cpu").get(kernel.name, shape, torch.float32)
    assert calls and stored is not None and got == stored["config"] and got != {"B": 64, "W": 2}
    n = len(calls)
    assert provider.config_provider(kernel.name, shape, torch.float32, cpu) == got and len(calls) == n
    provider.reset()  # a fresh process finds the stored entry: no tuning again
    assert provider.config_provider(kernel.name, shape, torch.float32, cpu) == got and len(calls) == n


# ----------------------------------------------------------------------------- search strategies

def _landscape(rng: random.Random, kind: str):
    """A synthetic launch-config cost landscape: smooth (a convex quadratic in the parameters'
    normalized ranks, with an interaction), a factor ~20 between best and worst, 3% noise, ~10%
    configs failing, and structured pruning like a real space's (big tiles need too much memory)."""
    params = {"gemm": {"BLOCK_M": [16, 32, 64, 128, 256], "BLOCK_N": [16, 32, 64, 128, 256],
                       "BLOCK_K": [16, 32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [2, 3, 4, 5]},
              "route": {"BLOCK_T": [16, 32, 64], "BLOCK_D": [32, 64, 128, 256], "DENSE_LEVELS": [0, 2, 3, 4, 5, 6],
                        "num_warps": [2, 4, 8]}}[kind]
    names = list(params)
    configs = [dict(zip(names, v)) for v in itertools.product(*params.values())]
    if kind == "gemm":  # shared memory: stages * (BM*BK + BK*BN) * 2 bytes <= 228 KiB
        configs = [c for c in configs if c["num_stages"] * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * 2 <= 228 * 1024]
    else:
        configs = [c for c in configs if not (c["BLOCK_T"] == 64 and c["BLOCK_D"] == 256)]
    opt = [rng.random() for _ in names]
    w = [rng.uniform(0.2, 1.0) for _ in names]
    w = [3.0 * x / sum(w) * len(names) / 2 for x in w]
    inter = rng.uniform(-1, 1) * math.sqrt(w[0] * w[1])
    noise = {search.config_key(c): math.exp(rng.gauss(0, 0.03)) for c in configs}
    failing = {k for k in noise if rng.random() < 0.1}

    def cost(c):
        key = search.config_key(c)
        if key in failing:
            return None
        d = [params[p].index(c[p]) / (len(params[p]) - 1) - o for p, o in zip(names, opt)]
        return math.exp(sum(wi * di * di for wi, di in zip(w, d)) + inter * d[0] * d[1]) * noise[key]

    return configs, cost


@pytest.mark.parametrize("batch", [1, 8], ids=["one-per-fit", "batches-of-8"])
@pytest.mark.parametrize("kind", ["gemm", "route"])
def test_budgeted_reaches_95_percent_with_a_quarter_of_the_measurements(kind, batch):
    """Also in batch mode (the cost model's 8 best predictions per fit, each batch prepared, i.e.
    compiled in parallel, before it is measured).

    The search is a heuristic: on a rare landscape it stops short of 95%. Measured on 10,000 route
    landscapes: one per fit none (6 before its picks also stepped from the best config, the worst at
    0.79), batches of 8 two (0.92, 0.94); on 1,500 gemm landscapes none in either mode. When all four
    had to reach it the test failed about 1 run in 1,250 (batches), so three of the four must (two
    misses: ~2e-7 a run), while a search that does not find the winners misses on most."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    short = []
    for trial in range(4):
        rng = random.Random(seed + trial)
        configs, cost = _landscape(rng, kind)
        measured, prepared = [], set()

        def objective(c):
            measured.append(search.config_key(c))
            assert batch == 1 or search.config_key(c) in prepared  # prepared before measured
            return cost(c)

        def prepare(group):
            assert 1 <= len(group) <= max(batch, 2 * len(configs[0]) + 2)  # the seed sample, then batches
            prepared.update(map(search.config_key, group))

        best = min(t for t in search.exhaustive(configs, cost).values() if t is not None)
        found = search.budgeted(configs, objective, seed=rng.randrange(1000), batch=batch,
                                prepare=prepare if batch > 1 else None)
        got = min(t for t in found.values() if t is not None)
        assert len(measured) <= len(configs) // 4 and len(set(measured)) == len(measured)
        if best / got < 0.95:
            short.append(f"seed {seed + trial}: {best / got:.3f} of the exhaustive winner's speed")
    assert len(short) <= 1, short


@pytest.mark.parametrize("seed,batch", [(1092162511, 8), (1343504427, 8), (109571, 1), (104283, 1)])
def test_budgeted_search_steps_from_the_best_config(seed, batch):
    """Landscapes where the model's picks alone stopped short: every batch of 8 once followed a wrong
    extrapolation (all at num_warps=8, whose samples happened to be good elsewhere; 0.93 of the
    winner), and one pick per fit stopped two steps from it (0.79 and 0.83). A quarter of the picks
    now step from the best config so far."""
    rng = random.Random(seed)
    configs, cost = _landscape(rng, "route")
    best = min(t for t in search.exhaustive(configs, cost).values() if t is not None)
    found = search.budgeted(configs, cost, seed=rng.randrange(1000), batch=batch, prepare=lambda g: None)
    assert len(found) <= len(configs) // 4
    assert best / min(t for t in found.values() if t is not None) >= 0.95


def test_exhaustive_prepares_each_chunk_before_measuring_it():
    configs = [{"A": a} for a in range(10)] + [{"A": 3}]  # a duplicate is measured once
    events = []
    out = search.exhaustive(configs, lambda c: events.append(("measure", c["A"])) or 1.0,
                            prepare=lambda g: events.append(("prepare", [c["A"] for c in g])), batch=4)
    assert len(out) == 10
    assert events[:5] == [("prepare", [0, 1, 2, 3])] + [("measure", a) for a in range(4)]
    assert events[5] == ("prepare", [4, 5, 6, 7]) and events[-3] == ("prepare", [8, 9])


def test_strategies_respect_caps_and_stop():
    configs = [{"A": a, "B": b} for a in range(8) for b in range(8)]
    calls = []
    search.run_strategy("exhaustive", configs, lambda c: calls.append(c) or 1.0 + c["A"])
    assert len(calls) == 64
    calls.clear()
    out = search.run_strategy("budgeted", configs, lambda c: calls.append(c) or 1.0 + c["A"], max_measurements=10)
    assert len(calls) == len(out) == 10
    calls.clear()
    search.run_strategy("budgeted", configs, lambda c: calls.append(c) or 1.0, should_stop=lambda: len(calls) >= 3)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="strategy"):
        search.run_strategy("annealing", configs, lambda c: 1.0)


# ----------------------------------------------------------------------------- the tuner

def test_prune_before_compiling(monkeypatch):
    kernel = _double_kernel()
    configs = [{"BLOCK_T": 16, "BLOCK_D": 32}, {"BLOCK_T": 24, "BLOCK_D": 32}, {"BLOCK_T": 16, "BLOCK_D": 256},
               {"BLOCK_T": 16, "BLOCK_D": 32}, {"BLOCK_T": 16, "BLOCK_D": 32, "num_warps": 3},
               {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 5}]
    monkeypatch.setattr(tuner, "smem_limit", lambda device: 100 * 1024)
    kept, why = tuner.prune(kernel, {"T": 5, "D": 48}, configs, torch.float16, torch.device("cpu"))
    assert kept == [{"BLOCK_T": 16, "BLOCK_D": 32}]
    reasons = " | ".join(why.values())
    assert "not a power of two" in reasons and "larger than the problem" in reasons
    assert "shared memory" in reasons and "num_warps=3" in reasons
    # a dim smaller than every block keeps the smallest block
    kept, _ = tuner.prune(kernel, {"T": 1, "D": 48}, [{"BLOCK_T": 16}, {"BLOCK_T": 32}], torch.float16, torch.device("cpu"))
    assert kept == [{"BLOCK_T": 16}]


def test_tuner_end_to_end_tree_route_known_winner():
    """The real tree_route kernel through the interpreter on a tiny space; the injected timer makes c2
    the winner, c3 is faster but wrong, c4 fails to run, two configs are pruned before compiling."""
    base = _tuning.registered()["tree_route"]
    shape = dict(base.presets["small"][0])
    c1 = {"BLOCK_T": 16, "BLOCK_D": 32, "DENSE_LEVELS": 0, "num_warps": 4}
    c2 = {"BLOCK_T": 32, "BLOCK_D": 64, "DENSE_LEVELS": 2, "num_warps": 4}
    c3 = {"BLOCK_T": 64, "BLOCK_D": 32, "DENSE_LEVELS": 0, "num_warps": 2}
    c4 = {"BLOCK_T": 16, "BLOCK_D": 64, "DENSE_LEVELS": 0, "num_warps": 8}
    pruned = [{"BLOCK_T": 24, "BLOCK_D": 32, "DENSE_LEVELS": 0, "num_warps": 4},
              {"BLOCK_T": 16, "BLOCK_D": 256, "DENSE_LEVELS": 0, "num_warps": 4}]
    default = base.default(shape)

    def run(inp, cfg):
        if cfg == c4:
            raise RuntimeError("out of resources (simulated)")
        out = base.run(inp, cfg)
        return (out + 1) % 2 ** shape["depth"] if cfg == c3 else out

    kernel = dataclasses.replace(base, space=lambda s: [c1, c2, c3, c4] + pruned, run=run)
    cost = {search.config_key(c): t for c, t in ((c1, 2.0), (c2, 1.0), (c3, 0.5), (default, 3.0))}
    timed = []

    def timer(fn, cfg):
        fn()  # the real (interpreted) kernel runs under the timer too
        timed.append(cfg)
        return cost[search.config_key(cfg)]

    dev = torch.device("cuda" if GPU else "cpu")
    res = tuner.tune(kernel, shape, torch.float32, dev, strategy="exhaustive", timer=timer)
    assert res.ok and res.best_config == c2 and res.best_time_ms == 1.0
    assert res.default_config == default and res.default_time_ms == 3.0 and res.speedup == 3.0
    status = {search.config_key(t.config): t.status for t in res.trials}
    assert status[search.config_key(c3)] == "wrong" and status[search.config_key(c4)] == "failed"
    assert sorted(status[search.config_key(c)] for c in pruned) == ["pruned", "pruned"]
    assert all(search.config_key(c) not in map(search.config_key, timed) for c in [c3, c4] + pruned)
    reasons = res.skipped()
    assert "out of resources" in reasons[search.config_key(c4)] and "tolerance" in reasons[search.config_key(c3)]
    # the winner really routes like the float64 reference
    inp = kernel.make_inputs(shape, torch.float32, dev)
    out = base.run(inp, res.best_config).cpu().numpy()
    ref = tree_ref.tree_route_ref(*(inp[k].double().cpu().numpy() for k in ("x", "w", "b")))
    assert base.error(inp, torch.from_numpy(out)) == 0.0 and (out == ref).mean() > 0.95
    entry = res.entry()
    assert entry["config"] == c2 and entry["rejected"] == 4 and entry["measured"] == 5 and entry["complete"]


@pytest.mark.skipif(GPU, reason="CPU pipeline test (the interpreter path)")
def test_compile_pool_runs_each_batch_in_workers_before_the_tuner_measures_it():
    """Real tree_route configs run once in two spawned worker processes (on a GPU that compiles them
    into Triton's cache) before the tuner times them; the winner is the injected timer's."""
    from tritonlab.autotune.compile_pool import CompilePool

    kernel = _tuning.registered()["tree_route"]
    shape = dict(kernel.presets["small"][0])
    space = kernel.space(shape)[:6]
    cost = {search.config_key(c): 1.0 + i for i, c in enumerate(space)}
    cost[search.config_key(space[4])] = 0.25
    pool = CompilePool(2)
    batches = []
    inner = pool.preparer("tree_route", shape, "float32", "cpu")

    def prepare(group):
        before = pool.ran + pool.failed
        inner(group)
        batches.append((len(group), pool.ran + pool.failed - before))

    try:
        res = tuner.tune(dataclasses.replace(kernel, space=lambda s: space), shape, torch.float32, torch.device("cpu"),
                         strategy="exhaustive", timer=lambda fn, cfg: cost.get(search.config_key(cfg), 9.0),
                         prepare=prepare, batch=2)
    finally:
        pool.close()
    assert res.ok and res.best_config == space[4]
    assert batches and all(n == done and n <= 2 for n, done in batches)  # every prepared config ran in a worker
    assert pool.failed == 0 and pool.broken is None


def test_compile_pool_failure_only_costs_time(cpu_pipeline):
    """A pool whose workers are gone prepares nothing and the tuning result is unchanged."""
    from tritonlab.autotune.compile_pool import CompilePool

    pool = CompilePool(1)
    pool.close()
    pool.run("tree_route", {"T": 3}, "float32", "cpu", [{"BLOCK_T": 16}])  # closed: a no-op
    assert pool.ran == 0
    kernel = _double_kernel(configs=[{"B": 16, "W": 2}, {"B": 32, "W": 2}])

    def broken(group):
        raise RuntimeError("worker died")
    res = tuner.tune(kernel, {"T": 3, "D": 5}, torch.float32, torch.device("cpu"), strategy="exhaustive",
                     timer=lambda fn, c: c["B"] + c["W"] / 8, prepare=broken, batch=2)
    assert res.ok and res.best_config == {"B": 16, "W": 2}


def test_a_config_that_faulted_the_gpu_in_a_worker_never_runs_here(cpu_pipeline):
    """prepare reports a CUDA fault for one config: the tuner records it as failed without running
    it (a fault in this process would poison its CUDA context); the others are measured as usual."""
    calls = []
    kernel = _double_kernel(configs=[{"B": 16, "W": 2}, {"B": 32, "W": 2}, {"B": 64, "W": 2}], calls=calls)
    bad = search.config_key({"B": 32, "W": 2})

    def prepare(group):
        return {bad: "RuntimeError: CUDA error: an illegal memory access was encountered"} \
            if bad in map(search.config_key, group) else {}
    res = tuner.tune(kernel, {"T": 3, "D": 5}, torch.float32, torch.device("cpu"), strategy="exhaustive",
                     timer=lambda fn, c: 100.0 / c["B"], prepare=prepare, batch=3)
    assert {"B": 32, "W": 2} not in calls
    assert res.ok and res.best_config == {"B": 64, "W": 2}
    assert "illegal memory access" in res.skipped()[bad]


def test_compile_workers_need_the_in_process_tuner(dirs, capsys):
    assert autotune_main(["--kernel", "tree_route", "--preset", "small", "--workers", "2",
                          "--compile-workers", "2"]) == 2
    assert "--compile-workers" in capsys.readouterr().err


def test_tuner_with_nothing_correct_reports_why(cpu_pipeline):
    kernel = _double_kernel(configs=[{"B": 16, "W": 2}], bad=[{"B": 16, "W": 2}, {"B": 16, "W": 4}])
    res = tuner.tune(kernel, {"T": 3, "D": 5}, torch.float32, torch.device("cpu"), timer=lambda fn, c: 1.0)
    assert not res.ok and "no config ran correctly" in res.error and "tolerance" in res.error
    with pytest.raises(ValueError, match="no config"):
        res.entry()


def test_run_job_writes_and_skips_done_jobs(dirs, monkeypatch):
    calls = []
    kernel = _double_kernel("fake_jobs", calls=calls)
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    job = runner.Job.make(kernel.name, {"T": 5, "D": 7}, torch.float32)
    cost = lambda fn, c: float(c["B"] * c["W"]) if fn() is not None else 0.0  # noqa: E731
    opts = runner.Options(strategy="exhaustive", timer=cost)
    s = runner.run_job(job, opts)
    assert s["status"] == "tuned" and s["config"] == {"B": 16, "W": 2} and s["time_ms"] == 32.0
    assert s["default_time_ms"] == 64.0 and s["speedup"] == 2.0
    n = len(calls)
    again = runner.run_job(job, opts)
    assert again["status"] == "cached" and len(calls) == n
    assert runner.run_job(job, dataclasses.replace(opts, retune=True))["status"] == "tuned" and len(calls) > n
    late = runner.run_job(runner.Job.make(kernel.name, {"T": 500, "D": 7}, torch.float32),
                          dataclasses.replace(opts, deadline=time.time() - 1))
    assert late["status"] == "skipped" and "budget" in late["reason"]


# ----------------------------------------------------------------------------- the CLI

def test_cli_tunes_tree_route_under_the_interpreter_then_nothing_new(dirs, capsys):
    user, _ = dirs
    args = ["--kernel", "tree_route", "--preset", "small", "--strategy", "budgeted", "--max-measurements", "2",
            "--config-dir", str(user)]
    assert autotune_main(args) == 0
    out = capsys.readouterr().out
    assert "tree_route" in out and "tuned" in out and "speedup" in out
    db = TuningDB(_slug(), user_dir=user)
    shape = _tuning.registered()["tree_route"].presets["small"][0]
    entry = db.get("tree_route", shape, torch.bfloat16)
    assert entry is not None and entry["measured"] <= 2 and entry["strategy"] == "budgeted"
    assert autotune_main(args) == 0
    out = capsys.readouterr().out
    assert "nothing new to tune" in out and "cached" in out
    assert autotune_main(["--show", "--config-dir", str(user)]) == 0
    assert "tree_route" in capsys.readouterr().out


def test_cli_without_gpu_or_interpreter_says_so(dirs, monkeypatch, capsys):
    if GPU:
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert autotune_main(["--kernel", "tree_route", "--preset", "small"]) == 2
    assert "no GPU to tune" in capsys.readouterr().err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune_main(["--kernel", "no_such_kernel", "--preset", "small"]) == 2
    assert "no_such_kernel" in capsys.readouterr().err
    for flag, value in (("--max-measurements", "0"), ("--max-measurements", "-1"), ("--budget", "nan"),
                        ("--budget", "0"), ("--workers", "0")):  # refused before anything is tuned
        assert autotune_main(["--kernel", "tree_route", "--preset", "small", flag, value]) == 2
        assert flag in capsys.readouterr().err
    assert autotune_main(["--kernel", "tree_route", "--preset", "small", "--dtype", "int16"]) == 2
    assert "int16" in capsys.readouterr().err


def test_cli_merge(dirs, tmp_path, capsys):
    user, _ = dirs
    a = tmp_path / "gpu_x.json"
    TuningFile(a).put("k", "float16", "T=1", _entry({"B": 1}, time_ms=1.0))
    assert autotune_main(["--merge", str(a), "--config-dir", str(user)]) == 0
    assert "1 added" in capsys.readouterr().out
    assert TuningDB("gpu_x", user_dir=user).get("k", {"T": 1}, "float16")["config"] == {"B": 1}


def test_cli_merge_refuses_bad_sources(dirs, tmp_path, capsys):
    """Found by fuzzing: a garbled source was set aside (the user's file renamed) and reported as
    merged; files of two devices went into this machine's database; a slug read from a file wrote
    outside the config folder. Now each is a clear error, exit 2, nothing renamed or written."""
    user, _ = dirs
    garbled = tmp_path / "gpu_x.json"
    garbled.write_text('{"kernels": ')
    assert autotune_main(["--merge", str(garbled), "--config-dir", str(user)]) == 2
    assert "not valid JSON" in capsys.readouterr().out and garbled.read_text() == '{"kernels": '
    a, b = tmp_path / "gpu_a.json", tmp_path / "gpu_b.json"
    TuningFile(a).put("k", "float16", "T=1", _entry({"B": 1}))
    TuningFile(b).put("k", "float16", "T=1", _entry({"B": 2}))
    assert autotune_main(["--merge", str(a), str(b), "--config-dir", str(user)]) == 2
    assert "different devices" in capsys.readouterr().out
    assert autotune_main(["--merge", str(a), str(b), "--slug", "gpu_a", "--config-dir", str(user)]) == 0
    capsys.readouterr()
    escaping = tmp_path / "esc.json"
    escaping.write_text(json.dumps({"slug": "../escaped", "kernels": {}}))
    assert autotune_main(["--merge", str(escaping), "--config-dir", str(user)]) == 2
    assert "plain file name" in capsys.readouterr().out and not (user.parent / "escaped.json").exists()
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        autotune_main(["--show", "--slug", "../x", "--config-dir", str(user)])
    assert exit_info.value.code == 2
    assert sorted(p.name for p in user.iterdir() if not p.name.startswith(".")) == ["gpu_a.json"]


@pytest.mark.skipif(GPU, reason="CPU pipeline test (the subprocess runs the interpreter path)")
def test_run_killed_midway_keeps_entries_and_resumes(dirs, plugin, capsys):
    user, _ = dirs
    args = ["--import", plugin, "--kernel", "fake_sleep", "--preset", "small", "--config-dir", str(user)]
    code = f"import sys; from tritonlab.autotune.cli import main; sys.exit(main({args!r}))"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    path = user / "cpu.json"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while _count(path) < 2 and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    kept = _count(path)  # the file parses: never half-written
    assert 2 <= kept < 6, f"killed after {kept} entries: {proc.stderr.read().decode()[-2000:]}"
    module = __import__(plugin)
    module.MADE.clear()
    assert autotune_main(args) == 0
    assert len(module.MADE) == 6 - kept and _count(path) == 6  # only the missing jobs were tuned
    module.MADE.clear()
    assert autotune_main(args) == 0
    assert module.MADE == [] and "nothing new to tune" in capsys.readouterr().out


@pytest.mark.skipif(GPU, reason="CPU pipeline test (workers pinned to GPUs otherwise)")
def test_worker_pool_tunes_in_other_processes(dirs, plugin):
    user, _ = dirs
    __import__(plugin)
    jobs = runner.plan(["fake_sleep"], "small")
    got = []
    opts = runner.Options(strategy="budgeted", max_measurements=2, config_dir=str(user), imports=(plugin,))
    runner.run_pool(jobs, opts, 2, got.append)
    assert sorted(s["status"] for s in got) == ["tuned"] * 6
    assert os.getpid() not in {s["pid"] for s in got}
    assert _count(user / "cpu.json") == 6


@pytest.mark.skipif(GPU, reason="CPU pipeline test (the interpreter path)")
def test_ray_local_cluster(dirs, plugin, capsys):
    pytest.importorskip("ray")
    user, _ = dirs
    args = ["--import", plugin, "--kernel", "fake_sleep", "--preset", "small", "--config-dir", str(user),
            "--ray", "local", "--strategy", "budgeted", "--max-measurements", "2"]
    assert autotune_main(args) == 0
    assert _count(user / "cpu.json") == 6
    assert "fake_sleep" in capsys.readouterr().out


def test_ray_missing_is_a_clear_error(dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r"tritonlab\[ray\]"):
        runner.import_ray()


def test_budgeted_on_a_tiny_space_with_failures():
    """Fewer than three runnable configs: no cost model, the search falls back to local moves."""
    out = search.budgeted([{"A": 1}, {"A": 2}, {"A": 3}], lambda c: None if c["A"] == 1 else float(c["A"]))
    assert out == {"A=1": None, "A=2": 2.0, "A=3": 3.0}


# ----------------------------------------------------------------------------- versus @triton.autotune

def _random_costs(configs):
    """Distinct random times (ms) per config, so the fastest is unique and known."""
    vals = random.sample(range(10, 10 + 10 * len(configs)), len(configs))
    return {search.config_key(c): v / 10 for c, v in zip(configs, vals)}


def test_triton_autotuner_class_picks_what_the_injected_timer_makes_fastest():
    """Triton's own Autotuner (not a re-implementation) over our configs through the adapter."""
    from triton.runtime.autotuner import Autotuner

    from tritonlab.autotune import versus

    calls = []
    configs = [{"BLOCK_T": b, "num_warps": w, "num_stages": s} for b in (16, 32) for w in (2, 4) for s in (2, 3)]
    broken = configs[5]
    costs = _random_costs(configs)
    costs[search.config_key(broken)] = 0.01  # would win, but cannot launch: the Autotuner scores it inf
    kernel = _double_kernel("fake_vs_pick", configs=configs, broken=[broken], calls=calls)
    timer = lambda fn, cfg: costs[search.config_key(cfg)]  # noqa: E731
    cpu = torch.device("cpu")
    pick = versus.triton_autotune_pick(kernel, {"T": 5, "D": 7}, torch.float32, cpu, configs=configs, timer=timer)
    fastest = min((c for c in configs if c != broken), key=lambda c: costs[search.config_key(c)])
    assert isinstance(pick.autotuner, Autotuner) and pick.ok
    assert pick.config == fastest and pick.time_ms == costs[search.config_key(fastest)]
    assert pick.measured == len(configs) and pick.timings[search.config_key(broken)] is None
    assert list(pick.failures) == [search.config_key(broken)] and "boom" in pick.failures[search.config_key(broken)]
    # every config launched with its own dict (launch fields included), the winner once more at the end
    assert all(c in calls for c in configs) and calls[-1] == fastest
    tc = versus.triton_config(configs[3])
    assert (tc.num_warps, tc.num_stages) == (configs[3]["num_warps"], configs[3]["num_stages"])
    assert tc.kwargs == {"BLOCK_T": configs[3]["BLOCK_T"], versus.CONFIG_KWARG: search.config_key(configs[3])}


def test_triton_autotuner_without_do_bench_parameter(monkeypatch):
    """A triton.autotune whose signature lacks do_bench/cache_results (older Triton): the adapter
    sets the benchmarker on the instance instead, and still gets the timer's winner."""
    import triton
    from triton.runtime.autotuner import Autotuner

    from tritonlab.autotune import versus

    def old_autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None, pre_hook=None,
                     post_hook=None, warmup=None, rep=None, use_cuda_graph=False):
        return lambda fn: Autotuner(fn, fn.arg_names, configs, key, reset_to_zero, restore_value)

    monkeypatch.setattr(triton, "autotune", old_autotune)
    configs = [{"BLOCK_T": b, "num_warps": w} for b in (16, 32, 64) for w in (2, 4)]
    costs = _random_costs(configs)
    kernel = _double_kernel("fake_vs_old", configs=configs)
    pick = versus.triton_autotune_pick(kernel, {"T": 5, "D": 7}, torch.float32, torch.device("cpu"), configs=configs,
                                       timer=lambda fn, cfg: costs[search.config_key(cfg)])
    assert pick.config == min(configs, key=lambda c: costs[search.config_key(c)])


def test_versus_tree_route_end_to_end_under_the_interpreter(dirs, monkeypatch):
    """The real tree_route kernel (through the interpreter here, compiled on a GPU) on a tiny space:
    both searches find the timer's winner, which is correct, and the side by side says so."""
    from tritonlab.autotune import versus

    user, _ = dirs
    base = _tuning.registered()["tree_route"]
    shape = dict(base.presets["small"][0])
    c1 = {"BLOCK_T": 16, "BLOCK_D": 32, "DENSE_LEVELS": 0, "num_warps": 4}
    c2 = {"BLOCK_T": 32, "BLOCK_D": 64, "DENSE_LEVELS": 2, "num_warps": 4}
    c3 = {"BLOCK_T": 64, "BLOCK_D": 32, "DENSE_LEVELS": 0, "num_warps": 2}
    pruned = {"BLOCK_T": 16, "BLOCK_D": 256, "DENSE_LEVELS": 0, "num_warps": 4}  # larger than D=48
    kernel = dataclasses.replace(base, name="tree_route_vs", space=lambda s: [c1, c2, c3, pruned])
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    default = kernel.default(shape)
    cost = {search.config_key(c): t for c, t in ((c1, 2.0), (c2, 1.0), (c3, 1.5), (default, 3.0))}
    space = versus.search_space(kernel, shape, torch.bfloat16, runner.tuning_device())
    assert pruned not in space and [c1, c2, c3] == space[:3] and default in space
    job = runner.Job.make(kernel.name, shape, torch.bfloat16)
    opts = runner.Options(strategy="exhaustive", timer=lambda fn, cfg: cost[search.config_key(cfg)], config_dir=str(user))
    row = versus.compare_job(job, opts, rounds=2)
    assert row["status"] == "ok" and row["our_source"] == "tuned" and row["our_search_s"] > 0
    assert row["our_config"] == c2 and row["triton_config"] == c2 and row["same_config"]
    assert row["our_correct"] and row["triton_correct"] and row["our_error"] <= base.tolerance(torch.bfloat16)
    assert row["triton_measured"] == row["triton_space"] == len(space) and row["triton_failed"] == 0
    assert row["our_ms"] == row["triton_ms"] == 1.0 and row["ratio"] == 1.0 and row["rounds"] == 2
    assert row["verdict"] == "same config"
    stored = TuningDB(_slug(), user_dir=user).get(kernel.name, shape, torch.bfloat16)
    assert stored["config"] == c2 and stored["search_s"] > 0  # the tuner records how long it searched


def test_versus_reports_a_wrong_triton_winner_and_verdicts(dirs, monkeypatch, cpu_pipeline):
    """Triton's autotuner does not check results: when the fastest config is wrong, it picks it and
    the comparison says so instead of timing it."""
    from tritonlab.autotune import versus

    user, _ = dirs
    configs = [{"B": b, "W": w} for b in (16, 32, 64) for w in (2, 4)]
    bad = {"B": 32, "W": 2}
    costs = _random_costs(configs)
    costs[search.config_key(bad)] = 0.05
    kernel = _double_kernel("fake_vs_wrong", configs=configs, bad=[bad])
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    opts = runner.Options(timer=lambda fn, cfg: costs[search.config_key(cfg)], config_dir=str(user))
    row = versus.compare_job(runner.Job.make(kernel.name, {"T": 5, "D": 7}, torch.float32), opts, rounds=1)
    ours = min((c for c in configs if c != bad), key=lambda c: costs[search.config_key(c)])
    assert row["triton_config"] == bad and row["our_config"] == ours
    assert row["status"] == "wrong" and not row["triton_correct"] and row["our_correct"]
    assert "triton winner fails the reference check" in row["reason"] and "our_ms" not in row
    assert versus.verdict(1.0, 1.0, 1.0, same=True) == "same config"
    assert versus.verdict(1.01, 1.0, 1.02, same=False) == "equal within noise"
    assert versus.verdict(1.10, 0.97, 1.2, same=False) == "equal within noise"
    assert versus.verdict(1.10, 1.05, 1.2, same=False) == "triton faster"
    assert versus.verdict(0.90, 0.85, 0.95, same=False) == "ours faster"


def test_cli_vs_triton_autotune_writes_the_table(dirs, monkeypatch, cpu_pipeline, tmp_path, capsys):
    user, _ = dirs
    configs = [{"B": b, "W": w} for b in (16, 32, 64) for w in (2, 4)]
    kernel = _double_kernel("fake_vs_cli", configs=configs)
    monkeypatch.setitem(_tuning._REGISTRY, kernel.name, kernel)
    # CPU tensors also on a GPU machine, where Triton's autotuner would otherwise time with its own do_bench
    monkeypatch.setattr(runner, "tuning_device", lambda: torch.device("cpu"))
    costs = _random_costs(configs)
    monkeypatch.setattr(tuner, "default_timer", lambda device: (lambda fn, cfg: costs[search.config_key(cfg)]))
    fastest = min(configs, key=lambda c: costs[search.config_key(c)])
    base = ["--vs-triton-autotune", "--kernel", kernel.name, "--preset", "small", "--config-dir", str(user),
            "--rounds", "2"]
    assert autotune_main(base + ["--out", str(tmp_path / "vs.csv")]) == 0
    out = capsys.readouterr().out
    assert kernel.name in out and "same config" in out and "geometric mean of ours/triton time: 1.000" in out
    import csv

    rows = list(csv.DictReader((tmp_path / "vs.csv").open()))
    assert len(rows) == 1 and rows[0]["our_config"] == rows[0]["triton_config"] == search.config_key(fastest)
    assert rows[0]["verdict"] == "same config" and float(rows[0]["ratio"]) == 1.0 and rows[0]["our_source"] == "tuned"
    # again: our pick now comes from the database; markdown output
    assert autotune_main(base + ["--out", str(tmp_path / "vs.md")]) == 0
    text = (tmp_path / "vs.md").read_text()
    assert "| fake_vs_cli | float32 | T=5,D=7 |" in text and " db |" in text and "same config" in text
    assert autotune_main(base + ["--workers", "2"]) == 2
    assert "--workers" in capsys.readouterr().err
