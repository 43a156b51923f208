"""Device identity for the tuning database and the reports."""
from __future__ import annotations

import re
from typing import Optional

import torch


def slugify(name: str) -> str:
    """Runs of non-alphanumerics -> '_' (the convention of vLLM and flash-linear-attention)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def device_name(device: Optional[torch.device] = None) -> str:
    """The GPU's name ("NVIDIA H100 80GB HBM3") or "cpu"."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def device_slug(device: Optional[torch.device] = None) -> str:
    """Slug of the device: "NVIDIA_H100_80GB_HBM3", or "cpu" for the host."""
    return slugify(device_name(device))
