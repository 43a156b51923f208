"""`tritonlab profile`: where the time of our ops goes, launch by launch.

    tritonlab profile [--kernel K ...] [--preset P] [--calls N] [--out FILE.md]

For every shape of the preset, our op (the report's "tritonlab" provider, checked against the
float64 reference first, exactly as the report does) is timed three ways over `--calls` calls:
- issue: host seconds to issue one call, without waiting for the device (the Python, torch and
  launch overhead: what a CUDA graph removes);
- wall: the same calls followed by one synchronize (per call);
- device: the summed durations of the device kernels and memsets of one call, from torch.profiler
  (CUDA only), with the number of launches and the heaviest kernels.
A call whose issue time exceeds its device time is host-bound: the GPU waits on Python. On a GPU
the file also gives the floors of an issue on that host (launch_costs): an empty Triton kernel
launched the usual way and through the compiled kernel's low-level `run`, and one allocation, which
split an op's issue time into Triton's launch path, the allocator and our own Python.
On a CPU there is no device trace; the table then lists the heaviest torch ops by self time.

The table goes to stdout and, as markdown, to `--out` (default reports/<device slug>/profile.md;
`tritonlab report` leaves the file alone).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import bench, cases
from .autotune.database import output_file_argument
from .kernels._triton import jit, tl
from .report import default_out_dir, resolve_device

#: the heaviest kernels (or CPU ops) listed per row
TOP = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", "-k", action="extend", nargs="+", default=None, metavar="K",
                        help="only these families or ops (e.g. tree_routing, fff_forward); repeatable")
    parser.add_argument("--preset", choices=cases.PRESETS, default=None,
                        help="shape preset (default: 'models' on a GPU, 'quick' on a CPU)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to profile")
    parser.add_argument("--calls", type=int, default=20, metavar="N", help="calls per measurement (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--out", default=None, metavar="FILE", type=output_file_argument, help="markdown file (default reports/<slug>/profile.md)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_events(prof) -> list:
    """The profiler's device-side events (kernels, memsets, copies): they carry a CUDA device type
    (record_function spans do too, on the GPU timeline: they are not work, so they are left out)."""
    return [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)]


def profile_call(fn: Callable[[], Any], device: torch.device, calls: int) -> dict:
    """Issue, wall and (CUDA) device time per call of `fn`, in microseconds, and the heaviest parts."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    _sync(device)
    done = time.perf_counter()
    out = {"issue_us": (issued - start) / calls * 1e6, "wall_us": (done - start) / calls * 1e6}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    if device.type == "cuda":
        per_name: dict[str, list[float]] = {}
        for e in _device_events(prof):
            per_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        # no device events at all means the profiler saw none (CUPTI unavailable), not free work
        out["device_us"] = sum(sum(v) for v in per_name.values()) / calls if per_name else None
        out["launches"] = sum(len(v) for v in per_name.values()) / calls
        heavy = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:TOP]
        out["top"] = [(name, sum(v) / calls, len(v) / calls) for name, v in heavy]
    else:
        ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        heavy = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:TOP]
        out["top"] = [(e.key, e.self_cpu_time_total / calls, e.count / calls) for e in heavy]
    return out


@jit
def empty_kernel(a0, a1, a2, a3, a4, a5, a6, n0, n1, n2, n3, n4, n5,
                 C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
                 C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr, C8: tl.constexpr, C9: tl.constexpr,
                 C10: tl.constexpr, C11: tl.constexpr):
    """Does nothing, with the argument list of tree_walk_kernel (13 runtime arguments, 12
    constexprs): its launch cost is the floor of every launch of ours."""
    pass


def launch_costs(device: torch.device, calls: int = 2000) -> dict[str, float]:
    """Host microseconds to issue (CUDA only; {} elsewhere): one launch of an empty Triton kernel
    through `kernel[grid](...)`; the same compiled kernel through its low-level `run` (Triton 3.x's
    own launch sequence without the argument binding and cache lookup, when this Triton has it);
    one `torch.empty` of 1 KiB. Tells how much of an op's issue time is Triton's launch path, ours,
    or the allocator."""
    if device.type != "cuda":
        return {}
    t = torch.empty(256, device=device)
    args = (t,) * 7 + (1000, 768, 768, 768, 3, 5)
    consts = dict(C0=8, C1=False, C2=True, C3=False, C4=True, C5=4, C6=16, C7=True, C8=False, C9=16, C10=128, C11=3)
    out: dict[str, float] = {}

    def per_call(fn) -> float:
        fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize(device)
        return elapsed / calls * 1e6

    out["triton launch"] = per_call(lambda: empty_kernel[(4,)](*args, **consts))
    try:  # version dependent: measured where the 3.x layout matches, skipped elsewhere
        import triton

        compiled = empty_kernel[(4,)](*args, **consts)
        stream = torch.cuda.current_stream(device).cuda_stream
        every = (*args, *consts.values())
        hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
        low = lambda: compiled.run(4, 1, 1, stream, compiled.function, compiled.packed_metadata,  # noqa: E731
                                   compiled.launch_metadata((4,), stream, *every), *hooks, *every)
        low()
        out["triton low-level run"] = per_call(low)
    except Exception:  # noqa: BLE001  (another Triton layout: leave the row out)
        torch.cuda.synchronize(device)
    out["torch.empty 1 KiB"] = per_call(lambda: torch.empty(256, device=device))
    return out


def _short(name: str, width: int = 48) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


def _fmt_us(v: Optional[float]) -> str:
    """Microseconds, always (the columns say "us"; an "ms" value under them misread by 1000x)."""
    return "-" if v is None else f"{v:.1f}"


def to_markdown(rows: list[dict], device: torch.device, preset: str, calls: int,
                costs: Optional[dict[str, float]] = None) -> str:
    device_side = device.type == "cuda"
    head = ["kernel", "shape", "dtype", "issue us", "wall us"]
    head += ["device us", "launches", "bound"] if device_side else []
    head += ["heaviest " + ("kernels (us, launches per call)" if device_side else "torch ops (self us, calls per call)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["kernel"], r["shape"], r["dtype"], r["error"], ""] + (["", "", ""] if device_side else []) + [""]
        else:
            top = "; ".join(f"{_short(n)} {_fmt_us(us)} x{cnt:g}" for n, us, cnt in r["top"])
            cells = [r["kernel"], r["shape"], r["dtype"], _fmt_us(r["issue_us"]), _fmt_us(r["wall_us"])]
            if device_side:
                bound = "-" if r["device_us"] is None else "host" if r["issue_us"] > r["device_us"] else "device"
                cells += [_fmt_us(r["device_us"]), f"{r['launches']:g}", bound]
            cells.append(top)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    title = f"# Profile of tritonlab's ops ({device.type}, preset {preset}, {calls} calls per measurement)\n\n"
    intro = ("Generated by `tritonlab profile`. issue: host time to issue one call without waiting; "
             "wall: per call with one final synchronize; device: summed kernel and memset durations of one call "
             "(torch.profiler); bound: host when issuing takes longer than the device work.\n\n")
    floor = ""
    if costs:
        floor = ("Issue-time floors on this host (us per call): "
                 + "; ".join(f"{name} {us:.1f}" for name, us in costs.items())
                 + " (empty Triton kernel with 13 arguments and 12 constexprs).\n\n")
    return title + intro + floor + "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.calls < 1:  # the table's title states the count: never one it did not use
        print(f"tritonlab profile: --calls must be >= 1, got {args.calls}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    preset = args.preset or ("models" if device.type == "cuda" else "quick")
    try:
        selected = cases.select(args.kernel)
    except ValueError as e:
        print(f"tritonlab profile: {e}", file=sys.stderr)
        return 2
    tasks, _, notes = bench.plan(selected, preset, device)
    opts = bench.preset_options(preset, device, compile_baselines=False)
    opts.seed = args.seed
    rows = []
    for task in tasks:
        label = {"kernel": task.case.kernel, "shape": cases.shape_label(task.shape), "dtype": task.dtype}
        checked = bench.check_task(task, opts, only=["tritonlab"])
        prepared = checked.ready.get("tritonlab")
        if prepared is None:
            row = checked.rows[0] if checked.rows else {}
            rows.append({**label, "error": f"{row.get('status', 'failed')}: {row.get('note', '')}"[:120]})
        else:
            rows.append({**label, **profile_call(prepared.fn, device, max(1, args.calls))})
        print(to_markdown(rows[-1:], device, preset, args.calls).splitlines()[-1], flush=True)
        del checked, prepared
        bench.release_memory(device)
    costs = launch_costs(device)
    for name, us in costs.items():
        print(f"issue-time floor: {name} {us:.1f} us", flush=True)
    text = to_markdown(rows, device, preset, args.calls, costs)
    out = Path(args.out) if args.out else default_out_dir(device) / "profile.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    for note in notes:
        print(note, file=sys.stderr)
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1
