"""Run one registered tunable kernel on one shape, a few times, with the config its launcher would
use here (the tuned entry, else the heuristic default): the program that Nsight Compute (`ncu`)
profiles for the stall reasons and memory traffic that CUDA events cannot show.

    python -m tritonlab.kernel_probe spectral_filter B=64,S=1024,D=768 [--dtype bfloat16] [--calls 3]

`.ci/gpu ncu` runs it under `ncu --set full` for the kernels whose reports are furthest from their
rooflines (the list is there, with how many launches of each to skip: the first call's, which
compiles, may be one launch or several). Exit status 1 when the output misses the reference's
tolerance: a profile of a wrong kernel is no finding.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .kernels import _tuning
from .kernels._triton import interpreting


def parse_shape(text: str) -> dict[str, int]:
    """'B=64,S=1024,D=768' -> {'B': 64, 'S': 1024, 'D': 768}."""
    shape = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"shape must look like B=64,S=1024,D=768, got {text!r}")
        shape[name.strip()] = int(value)
    return shape


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonlab.kernel_probe",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("kernel", help="a registered tunable kernel (an unknown name lists them)")
    p.add_argument("shape", help="NAME=INT pairs, e.g. B=64,S=1024,D=768")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args(argv)
    kernels = _tuning.registered()
    if args.kernel not in kernels:
        print(f"kernel_probe: unknown kernel {args.kernel!r}; registered: {', '.join(sorted(kernels))}",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or args.calls < 1:
        print(f"kernel_probe: --dtype must name a torch dtype and --calls be >= 1, got {args.dtype!r}, {args.calls}",
              file=sys.stderr)
        return 2
    try:
        shape = parse_shape(args.shape)
    except ValueError as e:
        print(f"kernel_probe: {e}", file=sys.stderr)
        return 2
    kernel = kernels[args.kernel]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not interpreting():
        print("kernel_probe: runs the Triton kernel, which needs a CUDA GPU here, or TRITON_INTERPRET=1 to "
              "interpret it on the CPU (checks the result; there is nothing to profile then)", file=sys.stderr)
        return 2
    try:
        config = _tuning.lookup_config(kernel.name, shape, dtype, device)
        inputs = kernel.make_inputs(shape, dtype, device)
    except KeyError as e:  # a shape name the kernel needs (some have defaults, so no fixed list)
        example = next((sh for shapes in kernel.presets.values() for sh in shapes), {})
        print(f"kernel_probe: {kernel.name} needs the shape name {e.args[0]!r}, got {sorted(shape)} "
              f"(e.g. {','.join(f'{k}={v}' for k, v in example.items() if isinstance(v, int))})", file=sys.stderr)
        return 2
    for _ in range(args.calls):
        out = kernel.run(inputs, dict(config))
    if device.type == "cuda":
        torch.cuda.synchronize()
    error = kernel.error(inputs, out)
    tolerance = kernel.tolerance(dtype)
    print(f"{kernel.name} {shape} {args.dtype} config {config}: {args.calls} calls, error {error:.3g} "
          f"(tolerance {tolerance:.3g}){'' if error <= tolerance else ': WRONG'}")
    return 0 if error <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
