"""The per-GPU tuning database: JSON files of tuned launch configs, and the lookup rule.

Files
-----
One JSON file per device slug (autotune/device.py): the shipped one, ``autotune/configs/<slug>.json``
(committed, read-only in an install), and the user's, ``<user dir>/<slug>.json``, where the user dir is
``$TRITONLAB_CONFIG_DIR`` or ``$XDG_CACHE_HOME/tritonlab/configs`` (``~/.cache/tritonlab/configs``).
A user entry overrides the shipped entry with the same key; tuning writes to the user file.

    {"format": 1, "slug": "NVIDIA_H100_80GB_HBM3", "device": "NVIDIA H100 80GB HBM3",
     "kernels": {"<kernel>": {"<dtype>": {"<shape key>": <entry>}}}}

An entry records the winner (``config``, ``time_ms``), the heuristic default (``default_config``,
``default_time_ms``), the shape it was measured on, how it was searched, the Triton/torch versions and
the date.

Writes are atomic: under a file lock (``.<slug>.json.lock`` beside the file) the file is re-read, the
entry added, and the whole file written to a temporary file in the same folder that then replaces it
(``os.replace``). A reader never sees half a file, two writers never lose each other's entries, and a
run killed at any point loses only the entry it was measuring. A file that does not parse is reported
(a warning) and renamed to ``<slug>.json.corrupt-<time>``; it is never fatal.

Shape keys and the lookup rule
------------------------------
Token-count dims (``T`` and ``M``, or a kernel's own ``token_dims``) are bucketed to the next power of
two; every other dim is kept exactly. The key is ``"D=768,T=128,depth=8"`` (sorted by name).
A lookup takes, in order:

1. the entry whose key is the problem's key (same bucket);
2. otherwise the nearest entry of the same kernel and dtype with the same dim names, where
   - every token dim lies on the same side of the decode/prefill threshold (bucket <= 64 tokens is
     decode): a decode-size config is never used for a prefill-size problem, nor the reverse;
   - every other dim below 16 matches exactly (those are flags, codes, top-k, tree depth, group
     counts), and every larger one is within a factor of 2 of the problem's;
   - "nearest" is the smallest sum over dims of |log2(entry) - log2(problem)| (ties: the larger
     token bucket, then the key's text), and the config must be one the kernel's space offers for
     the problem's shape (so it never breaks a fit or divisibility rule of the problem at hand);
3. otherwise nothing: the kernel's heuristic default runs (kernels/_tuning.lookup_config).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

FORMAT_VERSION = 1
#: a token-count bucket at or below this is a decode-size problem; above it, prefill-size
DECODE_MAX_TOKENS = 64
#: dims that count tokens (bucketed to powers of two) unless a kernel names its own `token_dims`
TOKEN_DIMS = ("T", "M")
#: the nearest-bucket rule takes other dims within this factor of the problem's only
MAX_OTHER_DIM_RATIO = 2.0
#: other dims below this are structural (flags, codes, top-k, tree depth, group counts): exact match only
STRUCTURAL_BELOW = 16
#: how long a writer waits for the file lock before giving up (seconds)
LOCK_TIMEOUT_S = 120.0

Entry = dict[str, Any]


# ----------------------------------------------------------------------------- folders and names

def shipped_config_dir() -> Path:
    """The configs shipped with the package (autotune/configs/)."""
    return Path(__file__).resolve().parent / "configs"


def user_config_dir() -> Path:
    """$TRITONLAB_CONFIG_DIR, else $XDG_CACHE_HOME/tritonlab/configs (default ~/.cache/tritonlab/configs)."""
    explicit = os.environ.get("TRITONLAB_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tritonlab" / "configs"


def dtype_name(dtype: torch.dtype | str) -> str:
    """'bfloat16' for torch.bfloat16 (the dtype level of the file)."""
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def config_key(config: Mapping[str, Any]) -> str:
    """A config as stable text: 'BLOCK_D=64,BLOCK_T=16,num_warps=4'."""
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


# ----------------------------------------------------------------------------- shape keys

def token_bucket(n: int) -> int:
    """Next power of two (1 for n <= 1): 3 -> 4, 100 -> 128, 128 -> 128."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def token_dims_of(kernel_name: str) -> tuple[str, ...]:
    """The token-count dims of a registered kernel (its `token_dims` attribute, else TOKEN_DIMS)."""
    from ..kernels import _tuning

    kernel = _tuning._REGISTRY.get(kernel_name)
    return tuple(getattr(kernel, "token_dims", None) or TOKEN_DIMS)


def bucket_shape(shape: Mapping[str, int], token_dims: Iterable[str] = TOKEN_DIMS) -> dict[str, int]:
    """The shape with its token dims bucketed to powers of two."""
    tokens = set(token_dims)
    return {k: (token_bucket(v) if k in tokens else int(v)) for k, v in shape.items()}


def shape_key(shape: Mapping[str, int], token_dims: Iterable[str] = TOKEN_DIMS) -> str:
    """The database key of a shape: bucketed, sorted 'name=value' pairs joined by ','."""
    b = bucket_shape(shape, token_dims)
    return ",".join(f"{k}={b[k]}" for k in sorted(b))


def parse_shape_key(key: str) -> dict[str, int]:
    """Inverse of shape_key (of the bucketed shape)."""
    if not key:
        return {}
    out = {}
    for part in key.split(","):
        name, _, value = part.partition("=")
        out[name] = int(value)
    return out


def is_decode(tokens: int) -> bool:
    """True for a decode-size token count (its bucket is at most DECODE_MAX_TOKENS)."""
    return token_bucket(tokens) <= DECODE_MAX_TOKENS


def _log2(v: int) -> float:
    return math.log2(max(int(v), 1))


def nearest_key(problem: Mapping[str, int], keys: Iterable[str],
                token_dims: Iterable[str] = TOKEN_DIMS) -> list[str]:
    """Candidate keys for `problem` by the nearest-bucket rule (module docstring), best first.

    The exact key, if present, is not special here (it has distance 0 and comes first).
    """
    tokens = set(token_dims)
    want = bucket_shape(problem, tokens)
    ranked = []
    for key in keys:
        try:
            have = parse_shape_key(key)
        except ValueError:  # not name=int pairs (a hand-edited file): no problem's bucket
            continue
        if set(have) != set(want):
            continue
        ok, dist, tok = True, 0.0, 0
        for name, w in want.items():
            h = have[name]
            if name in tokens:
                if is_decode(h) != is_decode(w):
                    ok = False  # never cross the decode/prefill threshold
                    break
                tok += h
            elif h != w and (min(h, w) < STRUCTURAL_BELOW or max(h, w) > MAX_OTHER_DIM_RATIO * min(h, w)):
                ok = False
                break
            dist += abs(_log2(h) - _log2(w))
        if ok:
            ranked.append((dist, -tok, key))
    ranked.sort()
    return [key for _, _, key in ranked]


# ----------------------------------------------------------------------------- one file

def _empty(slug: str = "", device: str = "") -> dict:
    return {"format": FORMAT_VERSION, "slug": slug, "device": device, "kernels": {}}


_NEWER = "newer than this tritonlab understands"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _valid(data: Any) -> bool:
    """The structure lookups rely on: an int format, entries whose config is a dict and whose shape
    (if any) maps names to ints. Anything else would fail every lookup later, so the file is set
    aside instead. (A key that is not name=int pairs is skipped by the lookup: nearest_key.)"""
    if not isinstance(data, dict) or not isinstance(data.get("kernels"), dict):
        return False
    if not _is_int(data.get("format", FORMAT_VERSION)):
        return False
    for by_dtype in data["kernels"].values():
        if not isinstance(by_dtype, dict):
            return False
        for by_key in by_dtype.values():
            if not isinstance(by_key, dict):
                return False
            for entry in by_key.values():
                if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
                    return False
                shape = entry.get("shape", {})
                if not isinstance(shape, dict) or not all(_is_int(v) for v in shape.values()):
                    return False
    return True


def iter_entries(data: Mapping) -> Iterable[tuple[str, str, str, Entry]]:
    """(kernel, dtype, shape key, entry) for every entry of a loaded file."""
    for kernel, by_dtype in data.get("kernels", {}).items():
        for dtype, by_key in by_dtype.items():
            for key, entry in by_key.items():
                yield kernel, dtype, key, entry


def entry_count(data: Mapping) -> int:
    return sum(1 for _ in iter_entries(data))


class TuningFile:
    """One database file: tolerant reads, atomic locked writes."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")

    def __repr__(self) -> str:
        return f"TuningFile({str(self.path)!r})"

    def _lock(self):
        from filelock import FileLock  # a dependency; imported here so lookups without writes never need it

        return FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S)

    def _read(self) -> tuple[Optional[dict], Optional[str]]:
        """(data, None) on success or when the file is missing; (None, why) when it does not parse."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _empty(self.path.stem), None
        except OSError as e:
            return None, f"cannot read: {e}"
        except UnicodeDecodeError as e:  # binary garbage (a ValueError, not an OSError)
            return None, f"not UTF-8 text ({e})"
        try:
            data = json.loads(text)
        except ValueError as e:
            return None, f"not valid JSON ({e})"
        if not _valid(data):
            return None, "not a tuning database (unexpected structure)"
        if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            return None, f"format {data.get('format')} is {_NEWER} ({FORMAT_VERSION})"
        return data, None

    def load(self) -> dict:
        """The file's contents; an empty database when missing. A corrupted file is reported and set
        aside; one of a newer format is reported and ignored (left as it is for the newer tritonlab)."""
        data, why = self._read()
        if data is not None:
            return data
        if _NEWER in why:
            warnings.warn(f"tuning database {self.path}: {why}; ignoring it", RuntimeWarning, stacklevel=2)
            return _empty(self.path.stem)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock():
                data, why = self._read()  # another process may have replaced it meanwhile
                if data is not None:
                    return data
                if _NEWER in why:
                    return _empty(self.path.stem)
                self._set_aside(why)
        except OSError as e:  # a read-only shipped folder: report and ignore the file
            warnings.warn(f"tuning database {self.path} is unusable ({why}) and could not be set aside ({e}); "
                          "ignoring it", RuntimeWarning, stacklevel=2)
        return _empty(self.path.stem)

    def _set_aside(self, why: Optional[str]) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}")
        n = 1
        while aside.exists():  # set aside twice in one second: never overwrite the earlier copy
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{os.getpid()}-{n}")
        os.replace(self.path, aside)
        warnings.warn(f"tuning database {self.path} is corrupted ({why}); moved it to {aside.name} and "
                      "starting an empty one", RuntimeWarning, stacklevel=3)

    def _write(self, data: dict) -> None:
        """Atomic replace: temp file in the same folder, fsync, os.replace. Call under the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            try:  # mkstemp makes the file private; a database is meant to be shared and committed
                os.chmod(tmp, self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644)
            except OSError:
                pass
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def update(self, fn: Callable[[dict], None]) -> dict:
        """Read-modify-write under the lock: fn mutates the freshly read data, which is then written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            data, why = self._read()
            if data is None and _NEWER in why:
                raise RuntimeError(f"tuning database {self.path}: {why}; not writing to it")
            if data is None:
                self._set_aside(why)
                data = _empty(self.path.stem)
            fn(data)
            data["format"] = FORMAT_VERSION
            data.setdefault("slug", self.path.stem)
            self._write(data)
        return data

    def put(self, kernel: str, dtype: torch.dtype | str, key: str, entry: Entry, *, keep: str = "new") -> None:
        """Store one entry. keep="new" replaces what is there; keep="faster" keeps the faster winner."""

        def add(data: dict) -> None:
            by_key = data["kernels"].setdefault(kernel, {}).setdefault(dtype_name(dtype), {})
            old = by_key.get(key)
            if keep == "faster" and old is not None and not _faster(entry, old):
                return
            by_key[key] = entry
            if entry.get("device") and not data.get("device"):
                data["device"] = entry["device"]

        self.update(add)


def _time_of(entry: Entry) -> Optional[float]:
    """An entry's time_ms when it is a real measurement (a finite number > 0), else None: a
    hand-edited "fast", NaN or -1 neither wins nor blocks a measured entry forever."""
    t = entry.get("time_ms")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        return None
    return float(t)


def _faster(a: Entry, b: Entry) -> bool:
    """True when entry a should win over b: an entry without a usable time loses to one with it;
    then complete beats incomplete, then the lower time."""
    ta, tb = _time_of(a), _time_of(b)
    if (ta is None) != (tb is None):
        return tb is None
    if bool(a.get("complete", True)) != bool(b.get("complete", True)):
        return bool(a.get("complete", True))
    return ta is not None and ta < tb


def merge_files(sources: Iterable[os.PathLike | str], dest: os.PathLike | str) -> dict[str, int]:
    """Merge database files into `dest`, keeping the faster winner per (kernel, dtype, key).

    Per key: an entry with a usable time_ms (a finite number > 0) beats one without, then a complete
    entry beats a partial one (a run that ran out of time), then the lower time_ms wins; on a tie,
    or when neither has a usable time, the entry already there is kept (the destination's, else the
    one from the earlier source).

    Returns counts: {"added": new keys, "replaced": keys whose winner changed, "kept": keys left as they were}.
    """
    incoming: list[tuple[str, str, str, Entry]] = []
    devices = set()
    for src in sources:
        data, why = TuningFile(src)._read()  # a source is only read: never set aside, even when corrupted
        if data is None:
            raise ValueError(f"cannot merge {src}: {why}")
        if data.get("device") and isinstance(data["device"], str):
            devices.add(data["device"])
        incoming.extend(iter_entries(data))
    counts = {"added": 0, "replaced": 0, "kept": 0}

    def merge(data: dict) -> None:
        if data.get("device") and isinstance(data["device"], str):
            devices.add(data["device"])
        for kernel, dtype, key, entry in incoming:
            by_key = data["kernels"].setdefault(kernel, {}).setdefault(dtype, {})
            old = by_key.get(key)
            if old is None:
                by_key[key] = entry
                counts["added"] += 1
            elif _faster(entry, old):
                by_key[key] = entry
                counts["replaced"] += 1
            else:
                counts["kept"] += 1
        if len(devices) == 1 and not data.get("device"):
            data["device"] = next(iter(devices))

    TuningFile(dest).update(merge)
    if len(devices) > 1:
        warnings.warn(f"merged tuning databases of different devices: {sorted(devices)}", RuntimeWarning, stacklevel=2)
    return counts


# ----------------------------------------------------------------------------- the database of one device

def new_entry(*, config: Mapping[str, Any], time_ms: float, default_config: Mapping[str, Any],
              default_time_ms: Optional[float], shape: Mapping[str, int], device: str, **extra: Any) -> Entry:
    """An entry with the versions and the date filled in."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    entry: Entry = {
        "config": dict(config), "time_ms": float(time_ms),
        "default_config": dict(default_config),
        "default_time_ms": None if default_time_ms is None else float(default_time_ms),
        "speedup": (None if not default_time_ms or not time_ms else round(float(default_time_ms) / float(time_ms), 4)),
        "shape": {k: int(v) for k, v in shape.items()},
        "device": device, "triton": triton_version, "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "complete": True,
    }
    entry.update(extra)
    return entry


def check_slug(slug: object) -> str:
    """A device slug names one file in a database folder: no path separators, not '.' or '..'
    (a slug read from a file or typed as --slug must not write outside the folder)."""
    if not isinstance(slug, str) or not slug or slug in (".", "..") or "/" in slug or "\\" in slug or "\0" in slug:
        raise ValueError(f"device slug must be a plain file name (no path separators), got {slug!r}")
    return slug


def slug_argument(value: str) -> str:
    """argparse `type` for --slug options: check_slug's error as a usage error (exit 2, no traceback)."""
    try:
        return check_slug(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _creatable(path: Path, what: str, start: Path) -> None:
    """argparse error unless `path` can be made: the nearest existing folder from `start` upwards
    is a writable folder (the writers create the missing folders in between)."""
    parent = start
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{what} {str(path)!r}: folder {str(parent)!r} is not writable")


def output_file_argument(value: str) -> str:
    """argparse `type` for an output file option: checked before a long run rather than when it
    writes at the end (not an existing folder; its folder exists or can be created)."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"output file {value!r} is an existing folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"output file {value!r} is not writable")
    _creatable(path, "output file", path.parent)
    return value


def output_dir_argument(value: str) -> str:
    """argparse `type` for an output folder option: not an existing file, creatable, writable."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"output folder {value!r} is an existing file")
    _creatable(path, "output folder", path)
    return value


class TuningDB:
    """The tuning database of one device: the shipped file overlaid by the user's file.

    Reads are of the files as they are when `load` is first needed (call `reload` to re-read);
    `put` writes through to the user file and updates the in-memory view.
    """

    def __init__(self, slug: str, *, user_dir: Optional[os.PathLike | str] = None,
                 shipped_dir: Optional[os.PathLike | str] = None):
        self.slug = check_slug(slug)
        self.user_file = TuningFile(Path(user_dir if user_dir is not None else user_config_dir()) / f"{slug}.json")
        self.shipped_file = TuningFile(Path(shipped_dir if shipped_dir is not None else shipped_config_dir())
                                       / f"{slug}.json")
        self._entries: Optional[dict[tuple[str, str], dict[str, tuple[Entry, str]]]] = None

    def __repr__(self) -> str:
        return f"TuningDB({self.slug!r}, user={str(self.user_file.path)!r}, shipped={str(self.shipped_file.path)!r})"

    # -- reading
    def reload(self) -> None:
        self._entries = None

    def _view(self) -> dict[tuple[str, str], dict[str, tuple[Entry, str]]]:
        if self._entries is None:
            view: dict[tuple[str, str], dict[str, tuple[Entry, str]]] = {}
            same = self.user_file.path.resolve() == self.shipped_file.path.resolve()
            sources = [("user", self.user_file)] if same else [("shipped", self.shipped_file), ("user", self.user_file)]
            for source, f in sources:  # the user file comes last and overrides
                for kernel, dtype, key, entry in iter_entries(f.load()):
                    view.setdefault((kernel, dtype), {})[key] = (entry, source)
            self._entries = view
        return self._entries

    def entries(self) -> list[tuple[str, str, str, Entry, str]]:
        """(kernel, dtype, key, entry, source) for every entry, source "shipped" or "user"."""
        out = []
        for (kernel, dtype), by_key in sorted(self._view().items()):
            for key, (entry, source) in sorted(by_key.items()):
                out.append((kernel, dtype, key, entry, source))
        return out

    def get(self, kernel: str, shape: Mapping[str, int], dtype: torch.dtype | str) -> Optional[Entry]:
        """The entry of the problem's exact bucket, or None."""
        by_key = self._view().get((kernel, dtype_name(dtype)), {})
        found = by_key.get(shape_key(shape, token_dims_of(kernel)))
        return found[0] if found else None

    def has(self, kernel: str, shape: Mapping[str, int], dtype: torch.dtype | str) -> bool:
        """True when the exact bucket holds a complete entry (a run that ran out of time does not count)."""
        entry = self.get(kernel, shape, dtype)
        return entry is not None and bool(entry.get("complete", True))

    def lookup(self, kernel: str, shape: Mapping[str, int], dtype: torch.dtype | str,
               space: Optional[Callable[[Mapping[str, int]], list]] = None) -> tuple[Optional[dict], str]:
        """(config, how) by the lookup rule; how is "exact", "nearest" or "none" (config None).

        `space`, the kernel's config space, vets a config taken from another shape (see the rule).
        """
        by_key = self._view().get((kernel, dtype_name(dtype)))
        if not by_key:
            return None, "none"
        tokens = token_dims_of(kernel)
        exact = shape_key(shape, tokens)
        offered: Optional[set[str]] = None
        for key in nearest_key(shape, by_key.keys(), tokens):
            entry = by_key[key][0]
            same_shape = {k: int(v) for k, v in entry.get("shape", {}).items()} == {k: int(v) for k, v in shape.items()}
            if not same_shape and space is not None:
                if offered is None:
                    try:
                        offered = {config_key(c) for c in space(shape)}
                    except Exception:  # a space that cannot describe this shape vets nothing
                        offered = set()
                if offered and config_key(entry["config"]) not in offered:
                    continue
            return dict(entry["config"]), ("exact" if key == exact else "nearest")
        return None, "none"

    # -- writing
    def put(self, kernel: str, shape: Mapping[str, int], dtype: torch.dtype | str, entry: Entry,
            *, keep: str = "new") -> str:
        """Write an entry for the problem's bucket to the user file; returns its key."""
        key = shape_key(shape, token_dims_of(kernel))
        view = self._view()
        current = view.setdefault((kernel, dtype_name(dtype)), {}).get(key)
        if keep == "faster" and current is not None and current[1] == "shipped" and not _faster(entry, current[0]):
            return key  # the shipped entry is faster: writing a slower user entry would win over it on reload
        self.user_file.put(kernel, dtype, key, entry, keep=keep)
        if keep != "faster" or current is None or _faster(entry, current[0]):
            view[(kernel, dtype_name(dtype))][key] = (entry, "user")
        return key


def available_slugs(*dirs: os.PathLike | str) -> list[str]:
    """Device slugs with a database file in the given folders (default: user and shipped)."""
    folders = [Path(d) for d in dirs] or [user_config_dir(), shipped_config_dir()]
    return sorted({p.stem for d in folders if d.is_dir() for p in d.glob("*.json")})
