"""The `tritonlab` command: env, autotune, report, profile, compile-check.

Each subcommand's options and work live with the code they drive (lab/report.py,
tritonlab.autotune.cli); this file only wires them up.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence


def _cmd_env(args: argparse.Namespace) -> int:
    from .env import environment

    for key, value in environment().items():
        print(f"{key:>20}: {value}")
    return 0


# subcommand -> (module providing add_arguments(parser) and run(args) -> int, help)
_DELEGATED = {
    "autotune": ("tritonlab.autotune.cli", "tune the kernels for this GPU and write its tuning database"),
    "report": ("tritonlab.report", "benchmark every kernel family here and regenerate reports/<device>/"),
    "profile": ("tritonlab.profiling", "where our ops' time goes: host issue time, device time, launches, heaviest kernels"),
    "compile-check": ("tritonlab.autotune.offline", "compile every kernel for a GPU architecture without the GPU: "
                      "errors, registers, spills, shared memory"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="device, device slug, backends, torch/Triton/CUDA versions")
    env.set_defaults(func=_cmd_env)
    for name, (module_name, help_text) in _DELEGATED.items():
        p = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            p.set_defaults(func=lambda a, n=name: _missing(n))
            continue
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _missing(name: str) -> int:
    print(f"tritonlab {name}: not available in this build yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
