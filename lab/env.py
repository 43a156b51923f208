"""What this machine is and which backends run here (`tritonlab env`, and the reports' environment block)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from typing import Any

import torch

from .autotune import device_name, device_slug
from .kernels._triton import HAS_TRITON, interpreting


def _git_commit() -> str:
    """HEAD's short hash; TRITONLAB_COMMIT names it where the tree is an export without .git (a GPU box)."""
    if os.environ.get("TRITONLAB_COMMIT"):
        return os.environ["TRITONLAB_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Device, slug, backends and versions, as a flat dict."""
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "device": device_name(),
        "device_slug": device_slug(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda if cuda else None,
        "driver": None,
        "backends": "torch" + (", triton" if HAS_TRITON and (cuda or interpreting()) else ""),
        "triton_interpreter": interpreting(),
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if HAS_TRITON:
        import triton

        info["triton"] = triton.__version__
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info
