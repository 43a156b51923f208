"""`tritonlab compile-check` (autotune/offline.py): every registered kernel compiles for sm_90 on this
GPU-less machine, and the check reports what would fail on the GPU.

The check needs real (not interpreted) Triton kernels, so it runs in a subprocess without
TRITON_INTERPRET; this test process keeps the interpreter for the rest of the suite."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tritonlab.kernels._triton import HAS_TRITON, interpreting

TESTS = Path(__file__).parent


def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = pytest.mark.skipif(not (_ptxas_available() and platform.system() == "Linux"),
                                reason="needs Triton's NVIDIA backend (ptxas ships in its Linux wheel)")


def _run(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_every_kernel_compiles_for_sm90_and_gpu_failures_are_reported(tmp_path):
    out = tmp_path / "new" / "rows.json"  # a folder that does not exist yet is made
    proc = _run(["-m", "tritonlab.cli", "compile-check", "--arch", "90", "--preset", "small",
                 "--import", "compile_check_plugin", "--json", str(out)])
    rows = json.loads(out.read_text())
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    # the plugin's launch-impossible and failing kernels make the default check fail
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    (big,) = by_kernel.pop("cc_big_tiles")
    assert big["error"] is None and big["builds"][0]["shared"] >= 4 * 64 * 1024 > 232448
    assert "cannot launch" in proc.stdout and "cc_big_tiles" in proc.stdout
    (bad,) = by_kernel.pop("cc_raises")
    assert "this launcher always fails" in bad["error"]
    (ok,) = by_kernel.pop("cc_copy")
    assert ok["error"] is None and ok["builds"][0]["name"] == "_copy_kernel"
    # every registered kernel family: each small shape's default config compiles and could launch
    from tritonlab.kernels._tuning import registered

    assert set(by_kernel) == set(registered())
    for name, kernel_rows in by_kernel.items():
        for r in kernel_rows:
            assert r["error"] is None, (name, r["shape"], r["error"])
            assert r["is_default"] and r["builds"], (name, r["shape"])
            for b in r["builds"]:
                assert 0 < b["registers"] <= 255 and 0 <= b["shared"] <= 232448, (name, b)


def test_tuned_entries_are_checked_as_the_gpu_would_launch_them(tmp_path):
    """--configs tuned compiles each database entry's config over its shape's default."""
    from tritonlab.autotune.database import TuningFile, new_entry, shape_key

    db = tmp_path / "configs"
    tuned = {"BLOCK": 1024}  # num_warps comes from the shape's default, as the kernels merge it
    TuningFile(db / "FAKE_GPU.json").put("cc_copy", "float32", shape_key({"N": 5000}), new_entry(
        config=tuned, time_ms=1.0, default_config={"BLOCK": 128, "num_warps": 4}, default_time_ms=2.0,
        shape={"N": 5000}, device="fake"))
    out = tmp_path / "rows.json"
    proc = _run(["-m", "tritonlab.cli", "compile-check", "--configs", "tuned", "--slug", "FAKE_GPU",
                 "--import", "compile_check_plugin", "--json", str(out)], env={"TRITONLAB_CONFIG_DIR": str(db)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["kernel"] == "cc_copy" and row["shape"] == {"N": 5000} and row["config"] == {"BLOCK": 1024, "num_warps": 4}
    assert row["error"] is None and row["builds"][0]["name"] == "_copy_kernel"
    assert _run(["-m", "tritonlab.cli", "compile-check", "--configs", "tuned"]).returncode == 2  # no --slug
    empty = _run(["-m", "tritonlab.cli", "compile-check", "--configs", "tuned", "--slug", "NO_SUCH_GPU"],
                 env={"TRITONLAB_CONFIG_DIR": str(db)})
    assert empty.returncode == 2 and "holds no entry" in empty.stderr


def test_fp8_is_not_applicable_below_sm89():
    """On sm_80 the fp8 GEMM does not exist (Triton has no e4m3 there): n/a, not a failure; int8 compiles."""
    proc = _run(["-m", "tritonlab.cli", "compile-check", "--arch", "80", "--kernel", "scaled_matmul",
                 "--preset", "small"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "n/a: fp8_e4m3 GEMMs need compute capability >= 8.9" in proc.stdout
    assert "scaled_mm_kernel" in proc.stdout and "0 failed" in proc.stdout


def test_compile_only_restores_triton_and_the_backend_rule():
    code = """
import torch
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from tritonlab.autotune.offline import compile_only
from tritonlab.kernels import _backend
import compile_check_plugin as plugin
before, run_before = driver._active, JITFunction.run
x = torch.randn(100)
archs = []
for arch in (90, 80):  # one kernel, two targets in one process: each compiles for its own
    with compile_only(arch) as launched:
        plugin._copy_run((x, torch.empty_like(x)), {"BLOCK": 128, "num_warps": 4})
    archs.append(launched[0][1].metadata.target.arch)
assert archs == [90, 80], archs
try:
    with compile_only(90):
        assert _backend.resolve_backend("triton", torch.device("cpu")) == "triton"
        assert _backend.compile_target().capability == (9, 0)
        raise KeyError("inside")
except KeyError:
    pass
assert driver._active is before and JITFunction.run is run_before and _backend.compile_target() is None
try:
    _backend.resolve_backend("triton", torch.device("cpu"))
except ValueError as e:
    print("refused:", e)
"""
    proc = _run(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: backend='triton' got tensors on cpu" in proc.stdout


def test_compile_only_rejects_bad_arch_and_the_interpreter():
    from tritonlab.autotune.offline import compile_only

    with pytest.raises(ValueError, match="arch must be one of"):
        with compile_only(91):
            pass
    if interpreting():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            with compile_only(90):
                pass
