"""tritonlab.autotune: search spaces, tuner, per-GPU tuning database, shipped configs.

Depends on tritonlab.kernels only through its registry (`tritonlab.kernels._tuning`).
"""
from .device import device_name, device_slug, slugify

__all__ = ["device_name", "device_slug", "slugify"]
