"""tritonlab.autotune: search spaces, tuner, per-GPU tuning database, shipped configs.

Depends on tritonlab.kernels only through its registry (`tritonlab.kernels._tuning`). Importing it
installs the tuning database as the kernels' config provider (cheap: no file is read until the first
lookup on a GPU). The tuner, the runners and the CLI are imported on demand.

- database.py: the JSON files (shipped autotune/configs/<slug>.json + $TRITONLAB_CONFIG_DIR), shape
  buckets, the lookup rule, atomic locked writes, merge.
- provider.py: the cached lookup the kernels call; TRITONLAB_AUTOTUNE=1 tunes missing entries.
- search.py: exhaustive and budgeted search strategies.
- tuner.py: prune, check against the reference, time, pick, re-check one kernel on one shape.
- runner.py: jobs in this process, in N GPU processes, or on Ray.
- cli.py: `tritonlab autotune`.
"""
from . import provider as _provider
from .database import (DECODE_MAX_TOKENS, TuningDB, TuningFile, merge_files, shape_key, shipped_config_dir,
                       user_config_dir)
from .device import device_name, device_slug, slugify

_provider.install()

__all__ = ["device_name", "device_slug", "slugify", "TuningDB", "TuningFile", "merge_files", "shape_key",
           "shipped_config_dir", "user_config_dir", "DECODE_MAX_TOKENS", "tune", "reset_cache"]


def tune(*args, **kwargs):
    """tritonlab.autotune.tuner.tune (imported on first use)."""
    from .tuner import tune as _tune

    return _tune(*args, **kwargs)


def reset_cache() -> None:
    """Drop the cached lookups and databases (after changing the files or TRITONLAB_CONFIG_DIR)."""
    _provider.reset()
