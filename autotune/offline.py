"""`tritonlab compile-check`: compile the registered kernels for a GPU architecture, without the GPU.

    tritonlab compile-check [--arch 90] [--kernel K ...] [--preset small|models|full] [--dtype D ...]
                            [--configs default|all|tuned] [--slug SLUG] [--json FILE] [--import MODULE]

No development or CI machine here has a GPU, and the interpreter accepts kernels that the GPU
compiler rejects (a layout the backend cannot lower, a dot shape it does not support) or that
compile but cannot launch (more shared memory than the part has) or run slowly (registers spilled
to local memory). Triton compiles for any NVIDIA architecture on a machine without one (ptxas ships
in its wheel), so this runs each registered kernel's own launcher (its `make_inputs` and `run`, the
same calls the tuner makes) on CPU tensors inside `compile_only(arch)`:

- Triton's active driver is replaced by one that reports the target architecture, and
  `JITFunction.run` compiles without launching (Triton's own warmup path);
- kernels._backend's compile target lets backend="triton" take CPU tensors and answers the
  launchers' device queries (fp8 support, shared memory per block) for the target.

Kernel outputs are therefore never computed: this checks compilation and resources, not results
(the interpreter tests and the GPU tests check results). `--configs default` checks each shape's
heuristic default; `--configs all` the tuning space as the tuner would try it on that architecture;
`--configs tuned --slug S` the entries of device S's tuning database, each at the shape it was tuned
for (an entry tuned before a kernel changed may no longer compile; this finds it; at run time an
entry also serves the other shapes of its bucket, not compiled here). A kernel that does not exist
for the target and dtype (fp8 below sm_89) is reported n/a. While `compile_only` is active, every
Triton launch in the process (any thread) only compiles. Per compiled kernel it reports registers
per thread and the per-thread stack (spilled registers live there) from `cuobjdump -res-usage`,
and the dynamic shared memory from the compiled metadata, flagged against the architecture's
per-block limit. The same argument specializations as a real launch are compiled (alignment and
divisibility come from the actual tensors and ints), so the code is the one a GPU would build with
this Triton version; Triton's on-disk cache keeps it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..kernels import _backend
from ..kernels._triton import interpreting
from ..kernels._tuning import NotApplicable, TunableKernel, registered

#: shared memory a block may opt into, by architecture (bytes; CUDA programming guide, table of
#: technical specifications per compute capability)
SHARED_MEMORY_PER_BLOCK = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                           100: 232448, 103: 232448, 120: 101376}


@dataclasses.dataclass
class KernelBuild:
    """One compiled Triton kernel: its resources on the target."""

    name: str
    registers: Optional[int]  # per thread; None when cuobjdump is unavailable
    stack: Optional[int]  # bytes of local memory per thread (spilled registers), None when unknown
    shared: int  # dynamic shared memory per block, bytes
    seconds: float  # compile time (near zero on a Triton cache hit)
    launches: int = 1  # launches of this same binary in the call

    def flags(self, shared_limit: int) -> list[str]:
        out = []
        if self.shared > shared_limit:
            out.append(f"shared memory {self.shared} B > {shared_limit} B: cannot launch")
        if self.stack:
            out.append(f"spills ({self.stack} B stack)")
        return out


@dataclasses.dataclass
class CheckRow:
    """One (kernel, shape, dtype, config) run through compile-only mode."""

    kernel: str
    shape: dict
    dtype: str
    config: dict
    is_default: bool
    error: Optional[str]  # why it did not compile, else None
    builds: list[KernelBuild]
    not_applicable: Optional[str] = None  # the kernel does not exist for this arch and dtype (not a failure)

    def problems(self, shared_limit: int) -> list[str]:
        """What would fail on the GPU, or what the check could not verify."""
        if self.not_applicable:
            return []
        found = [self.error] if self.error else []
        if not self.error and not self.builds:
            found.append("no Triton kernel was compiled (the launcher took another path)")
        for b in self.builds:
            found += [f"{b.name}: {f}" for f in b.flags(shared_limit) if "cannot launch" in f]
            if b.registers is None:
                found.append(f"{b.name}: registers and spills unknown (cuobjdump missing or unreadable)")
        return found


class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports the target, owns no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self._target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> tuple[str, int]:
        # a key of its own: each JITFunction caches its target per device key, and a plain 0 would
        # mix this target into real launches on GPU 0 (or a real GPU's target into this check)
        return ("compile-only", self._target.arch)

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self):
        return self._target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def is_active() -> bool:
        return True


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list[tuple[str, Any, float]]]:
    """Inside: every Triton launch compiles for `arch` and returns without running; yields the list
    that collects (kernel name, CompiledKernel, seconds) per launch. Restores everything on exit."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if arch not in SHARED_MEMORY_PER_BLOCK:
        raise ValueError(f"arch must be one of {sorted(SHARED_MEMORY_PER_BLOCK)}, got {arch}")
    if _backend.compile_target() is not None:
        raise RuntimeError("compile_only is already active")
    if interpreting():
        raise RuntimeError("compile_only needs TRITON_INTERPRET unset: the kernels were built for the interpreter")
    launched: list[tuple[str, Any, float]] = []
    real_run = JITFunction.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((getattr(self, "__name__", None) or self.fn.__name__, kernel, time.perf_counter() - start))
        return kernel

    saved_driver = driver._active  # private, present in Triton 3.6 to 3.9; restored exactly
    driver.set_active(_TargetDriver(arch))
    JITFunction.run = compile_run
    _backend.set_compile_target(_backend.CompileTarget(arch, SHARED_MEMORY_PER_BLOCK[arch]))
    try:
        yield launched
    finally:
        _backend.set_compile_target(None)
        JITFunction.run = real_run
        driver._active = saved_driver


def _cuobjdump() -> Optional[str]:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def kernel_build(name: str, kernel: Any, seconds: float) -> KernelBuild:
    """Resources of a compiled kernel (registers and stack from its cubin, shared from its metadata)."""
    registers = stack = None
    tool = _cuobjdump()
    cubin = kernel.asm.get("cubin") if hasattr(kernel, "asm") else None
    if tool and cubin:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
        if m:
            registers, stack = int(m.group(1)), int(m.group(2))
    return KernelBuild(name, registers, stack, int(getattr(kernel.metadata, "shared", 0)), seconds)


def _distinct_builds(launched: list[tuple[str, Any, float]]) -> list[KernelBuild]:
    """One KernelBuild per distinct binary, in launch order (a launcher may launch one kernel per chunk)."""
    builds: dict[int, KernelBuild] = {}
    for name, kernel, seconds in launched:
        if kernel is None:
            continue
        if id(kernel) in builds:
            builds[id(kernel)].launches += 1
            builds[id(kernel)].seconds += seconds
        else:
            builds[id(kernel)] = kernel_build(name, kernel, seconds)
    return list(builds.values())


def check_kernel(kernel: TunableKernel, shape: dict, dtype: torch.dtype, configs: str | Sequence[dict] = "default",
                 arch: int = 90) -> list[CheckRow]:
    """Compile `kernel` on one shape and dtype (inputs built once, on the CPU) for `configs`: a list,
    "default" (the heuristic default) or "all" (the tuning space as the tuner would try it on this
    architecture: after tuner.prune, whose shared-memory rule then uses the target's limit)."""
    from .tuner import prune

    default = kernel.default(shape)
    rows = []
    with compile_only(arch) as launched:
        if configs == "default":
            configs = [default]
        elif configs == "all":
            configs = prune(kernel, shape, kernel.space(shape), dtype, torch.device("cpu"))[0]
        setup_error = not_applicable = None
        try:  # make_inputs may launch kernels too (a precomputed grouping): they count with the first row
            inputs = kernel.make_inputs(shape, dtype, torch.device("cpu"))
        except NotApplicable as e:
            not_applicable = str(e)
        except Exception as e:  # noqa: BLE001
            setup_error = f"make_inputs: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        for cfg in configs:
            error = setup_error
            if error is None and not_applicable is None:
                try:
                    kernel.run(inputs, dict(cfg))
                except Exception as e:  # noqa: BLE001  (any failure is the finding)
                    error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            builds = _distinct_builds(launched)
            launched.clear()
            rows.append(CheckRow(kernel.name, dict(shape), str(dtype).replace("torch.", ""), dict(cfg),
                                 dict(cfg) == default, error, builds, not_applicable))
    return rows


def run_check(kernels: Optional[Sequence[str]] = None, preset: str = "models", dtypes: Optional[Sequence[str]] = None,
              configs: str = "default", arch: int = 90, on_row=None, slug: Optional[str] = None) -> list[CheckRow]:
    """compile-check over the registry's jobs (runner.plan), `configs` as check_kernel's; or, with
    configs="tuned", over the entries of device `slug`'s tuning database (shipped file and user
    file, as the kernels read them: each entry's config over its shape's default, compiled at the
    shape it was tuned for)."""
    from .runner import parse_dtype, plan

    reg = registered()
    if configs == "tuned":
        from .database import TuningDB, parse_shape_key

        if not slug:
            raise ValueError("configs='tuned' needs the device slug of a tuning database (e.g. NVIDIA_H100_80GB_HBM3)")
        unknown = sorted(set(kernels or ()) - set(reg))
        if unknown:
            raise ValueError(f"unknown kernel(s) {unknown}; registered: {sorted(reg)}")
        jobs: dict[tuple, list[dict]] = {}
        for kernel, dtype, key, entry, _source in TuningDB(slug).entries():
            if kernel not in reg:
                print(f"compile-check: {slug}: entry for unregistered kernel {kernel!r} skipped", file=sys.stderr)
                continue
            if (kernels and kernel not in kernels) or not entry.get("config"):
                continue
            try:
                # an entry's own shape (the bucket's key when it has none, as database.lookup reads it)
                shape = {k: int(v) for k, v in (entry.get("shape") or parse_shape_key(key)).items()}
                cfg = dict(reg[kernel].default(shape), **entry["config"])
                parse_dtype(dtype)
            except Exception as e:  # noqa: BLE001  a hand-edited entry (a key that is no shape, a shape missing
                # dims the kernel needs, an unknown dtype): no lookup would serve it either
                print(f"compile-check: {slug}: entry {kernel} {dtype} {key!r} skipped "
                      f"({type(e).__name__}: {e})", file=sys.stderr)
                continue
            jobs.setdefault((kernel, tuple(shape.items()), dtype), []).append(cfg)
        if not jobs:
            raise ValueError(f"tuning database {slug!r} holds no entry to check (shipped or user file; see "
                             "`tritonlab autotune --show --slug ...`)")
        todo = [(reg[k], dict(shape), parse_dtype(dt), cfgs) for (k, shape, dt), cfgs in jobs.items()]
    else:
        todo = [(reg[job.kernel], job.shape_dict, parse_dtype(job.dtype), configs)
                for job in plan(kernels, preset, dtypes)]
    rows: list[CheckRow] = []
    for kernel, shape, dtype, cfgs in todo:
        for row in check_kernel(kernel, shape, dtype, cfgs, arch):
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .database import output_file_argument, slug_argument

    p.add_argument("--arch", type=int, default=90,
                   help="compute capability as one number: 80 (A100), 89 (L4/L40), 90 (H100/H200), 100 (B200)")
    p.add_argument("--kernel", "-k", nargs="+", action="extend", metavar="K",
                   help="registered kernels to check (default: all)")
    p.add_argument("--preset", choices=("small", "models", "full"), default="models", help="shape preset")
    p.add_argument("--dtype", nargs="+", action="extend", metavar="D", help="dtypes (default: each kernel's own)")
    p.add_argument("--configs", choices=("default", "all", "tuned"), default="default",
                   help="each shape's heuristic default, the tuning space the tuner would try on this "
                        "architecture (a survey), or the entries of --slug's tuning database")
    p.add_argument("--slug", default=None, type=slug_argument, help="device slug of the database for --configs tuned")
    p.add_argument("--json", default=None, metavar="FILE", type=output_file_argument, help="also write every row as JSON")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers more tunable kernels)")


def _describe(row: CheckRow, limit: int) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in row.config.items())
    shape = ",".join(f"{k}={v}" for k, v in row.shape.items())
    head = f"{row.kernel:<18} {shape:<40} {row.dtype:<9} {cfg}"
    if row.not_applicable:
        return f"{head}\n    n/a: {row.not_applicable}"
    if row.error:
        return f"{head}\n    FAILED {row.error}"
    parts = []
    for b in row.builds:
        regs = "?" if b.registers is None else b.registers
        notes = "; ".join(b.flags(limit))
        times = f" x{b.launches}" if b.launches > 1 else ""
        parts.append(f"    {b.name}{times}: {regs} regs, {b.shared // 1024} KB shared, {b.seconds:.1f} s"
                     + (f"  [{notes}]" if notes else ""))
    return "\n".join([head] + parts)


def run(args: argparse.Namespace) -> int:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        print(f"tritonlab compile-check needs Triton with its NVIDIA backend: {e}", file=sys.stderr)
        return 2
    from .runner import import_plugins

    if interpreting():
        print("tritonlab compile-check compiles real kernels: unset TRITON_INTERPRET (under the interpreter "
              "Triton builds interpreted functions, which have nothing to compile)", file=sys.stderr)
        return 2
    limit = SHARED_MEMORY_PER_BLOCK.get(args.arch)
    if limit is None:
        print(f"--arch must be one of {sorted(SHARED_MEMORY_PER_BLOCK)}", file=sys.stderr)
        return 2
    import_plugins(args.imports)
    start = time.perf_counter()
    if args.configs == "tuned" and not args.slug:
        print("--configs tuned needs --slug (a file name in autotune/configs/ or $TRITONLAB_CONFIG_DIR, "
              "without .json)", file=sys.stderr)
        return 2
    try:
        rows = run_check(args.kernel, args.preset, args.dtype, args.configs, args.arch,
                         on_row=lambda r: print(_describe(r, limit), flush=True), slug=args.slug)
    except ValueError as e:
        print(f"tritonlab compile-check: {e}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.problems(limit)]
    if args.configs == "tuned" and (args.preset != "models" or args.dtype):
        print("compile-check: --preset and --dtype do not apply to --configs tuned (the database's entries are checked)",
              file=sys.stderr)
    spilled = [r for r in rows if any(b.stack for b in r.builds)]
    print(f"\n{len(rows)} config(s) compiled for sm_{args.arch} in {time.perf_counter() - start:.0f} s: "
          f"{len(failed)} failed or cannot launch, {len(spilled)} spill registers, "
          f"{sum(1 for r in rows if r.not_applicable)} n/a")
    for r in failed:
        print(f"  {r.kernel} {r.shape} {r.dtype} {r.config}: {'; '.join(r.problems(limit))}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 1 if args.configs != "all" and failed else 0
