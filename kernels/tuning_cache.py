"""On-disk cache of the kernels' first-call tuning results, shared by later processes.

Each tuner keeps its picks in an in-memory dict; on a miss there it asks this cache before
timing candidates, and stores what a real timing picked. One JSON file per (GPU, software)
fingerprint lives in ``$LAYERSTREAM_CACHE/tuning`` (else ``$XDG_CACHE_HOME/layerstream/tuning``,
else ``~/.cache/layerstream/tuning``), named ``<gpu name>-<16 hex chars>``: a sha256 over the GPU
name, compute capability, SM count, torch and triton versions and the source of every
``kernels/*.py``, so an upgrade or any kernel change starts a fresh file.

A file is read once per process; a store re-reads it under an exclusive ``flock`` of the
directory, merges and replaces it atomically (temp file, fsync, ``os.replace``), so processes
tuning different shapes keep each other's entries. A corrupt file or an unwritable directory
logs one warning (the cache then works in memory); no cache problem ever raises. The cache is
off with ``LAYERSTREAM_TUNING_CACHE=0``, off CUDA and under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import triton

from kernels import tuning_defaults

try:
    import fcntl
except ImportError:  # not POSIX: stores are not serialised between processes
    fcntl = None

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KERNELS_DIR = Path(__file__).resolve().parent
_SCALARS = (bool, int, float, str, type(None))
T = TypeVar("T")


def cache_dir() -> Path:
    """``$LAYERSTREAM_CACHE/tuning``, else ``$XDG_CACHE_HOME/layerstream/tuning``, else ``~/.cache/...``."""
    if root := os.environ.get("LAYERSTREAM_CACHE"):
        return Path(root).expanduser() / "tuning"
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "layerstream" / "tuning"
    return Path.home() / ".cache" / "layerstream" / "tuning"


def source_digest(directory: Path) -> str:
    """sha256 (hex) over the names and bytes of every ``*.py`` file in ``directory``."""
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def _kernels_digest() -> str:
    return source_digest(_KERNELS_DIR)


def file_stem(gpu: str, capability: tuple[int, int], sms: int, torch_version: str,
              triton_version: str, sources: str) -> str:
    """Cache file name (no suffix): the sanitised GPU name and 16 hex chars of the fingerprint."""
    h = hashlib.sha256()
    for part in (gpu, f"{capability[0]}.{capability[1]}", str(sms), torch_version, triton_version, sources):
        h.update(part.encode() + b"\0")
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', gpu).strip('_.') or 'gpu'}-{h.hexdigest()[:16]}"


def config_to_json(cfg: triton.Config) -> dict[str, Any]:
    """A launch config as JSON: its kwargs (in order), num_warps and num_stages."""
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def config_from_json(d: Any) -> triton.Config:
    """The inverse of :func:`config_to_json`; ValueError when ``d`` is not such a value."""
    if not isinstance(d, dict) or set(d) != {"kwargs", "num_warps", "num_stages"}:
        raise ValueError(f"not a launch config: {d!r}")
    kwargs, warps, stages = d["kwargs"], d["num_warps"], d["num_stages"]
    if not (isinstance(kwargs, dict) and all(isinstance(k, str) and isinstance(v, _SCALARS)
                                             for k, v in kwargs.items())):
        raise ValueError(f"bad launch config kwargs: {kwargs!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) for n in (warps, stages)):
        raise ValueError(f"bad num_warps / num_stages: {warps!r}, {stages!r}")
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages)


@contextlib.contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Exclusive flock of ``directory`` (no lock file to leave behind) while held."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class TuningCache:
    """The entries (kernel -> key string -> JSON value) of one cache file."""

    def __init__(self, path: Path, header: dict[str, Any] | None = None) -> None:
        self.path, self.header = Path(path), dict(header or {})
        self._entries: dict[str, dict[str, Any]] | None = None
        self._writable, self._warned_bad = True, False
        self._lock = threading.Lock()

    def get(self, kernel: str, key: str) -> Any | None:
        """The stored value or None; the file is read on the first call."""
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            return self._entries.get(kernel, {}).get(key)

    def put(self, kernel: str, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) and write the file merged with its current content."""
        try:
            value = json.loads(json.dumps(value))  # as a later process will read it back
        except (TypeError, ValueError) as e:
            log.warning("not caching %s tuning for %s: %s", kernel, key, e)
            return
        with self._lock:
            if self._entries is None:
                self._entries = self._read()
            self._entries.setdefault(kernel, {})[key] = value
            if self._writable:
                self._merge_and_write(self._entries)

    def _merge_and_write(self, entries: dict[str, dict[str, Any]]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _dir_lock(self.path.parent):
                for kernel, section in self._read().items():  # entries other processes stored since
                    mine = entries.setdefault(kernel, {})
                    for key, value in section.items():
                        mine.setdefault(key, value)
                self._write({**self.header, "version": FORMAT_VERSION, "entries": entries})
        except OSError as e:
            self._writable = False
            log.warning("cannot write the kernel tuning cache %s (%s); tuning results are kept in memory "
                        "only and will be timed again next run", self.path, e)

    def _read(self) -> dict[str, dict[str, Any]]:
        """The file's entries; empty (one warning per instance) when unreadable or of another format."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (the write warns if it fails)
            return {}
        except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8
            return self._bad(str(e))
        entries = raw.get("entries") if isinstance(raw, dict) and raw.get("version") == FORMAT_VERSION else None
        if not isinstance(entries, dict):
            return self._bad("unknown format")
        return {k: dict(v) for k, v in entries.items() if isinstance(v, dict)}

    def _bad(self, why: str) -> dict[str, dict[str, Any]]:
        if not self._warned_bad:
            self._warned_bad = True
            log.warning("ignoring the kernel tuning cache %s (%s); it will be rewritten", self.path, why)
        return {}

    def _write(self, content: dict[str, Any]) -> None:
        text = json.dumps(content, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.stem}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# cache file -> its entries, one per process
_CACHES: dict[Path, TuningCache] = {}


def enabled(device: torch.device) -> bool:
    """Whether the cache is on for ``device`` (CUDA, not the interpreter, LAYERSTREAM_TUNING_CACHE != 0)."""
    return (device.type == "cuda" and os.environ.get("LAYERSTREAM_TUNING_CACHE", "1") != "0"
            and os.environ.get("TRITON_INTERPRET") != "1")


@functools.cache
def _gpu_info(index: int) -> tuple[str, tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return props.name, (props.major, props.minor), props.multi_processor_count


def _device_info(device: torch.device) -> tuple[str, tuple[int, int], int]:
    """(name, compute capability, SM count) of a CUDA device."""
    return _gpu_info(device.index if device.index is not None else torch.cuda.current_device())


def _cache_for(device: torch.device) -> TuningCache | None:
    """The cache of ``device`` with the running software; None where the cache is off."""
    if not enabled(device):
        return None
    name, capability, sms = _device_info(device)
    stem = file_stem(name, capability, sms, torch.__version__, triton.__version__, _kernels_digest())
    path = cache_dir() / f"{stem}.json"
    if path not in _CACHES:
        header = {"gpu": name, "capability": list(capability), "sms": sms,
                  "torch": torch.__version__, "triton": triton.__version__}
        _CACHES[path] = TuningCache(path, header)
    return _CACHES[path]


def has_entries(device: torch.device) -> bool:
    """Whether an earlier process left tuning results for ``device`` with this software, or picks are
    shipped for this GPU (False where the cache is off or unreadable)."""
    try:
        cache = _cache_for(device)
        return cache is not None and (cache.path.is_file() or tuning_defaults.has_defaults(_device_info(device)[0]))
    except Exception:  # noqa: BLE001 - only decides whether to print a note
        return False


def _key_str(key: tuple) -> str:
    return json.dumps(list(key), default=str)  # torch dtypes as str(dtype)


def lookup(device: torch.device, kernel: str, key: tuple) -> Any | None:
    """The JSON value stored for ``kernel``'s ``key`` on ``device``, else the pick shipped for this GPU
    (``kernels.tuning_defaults``); None on a miss or with the cache off."""
    try:
        cache = _cache_for(device)
        if cache is None:
            return None
        hit = cache.get(kernel, _key_str(key))
        return hit if hit is not None else tuning_defaults.lookup(_device_info(device)[0], kernel, _key_str(key))
    except Exception as e:  # noqa: BLE001 - a cache problem must never fail a kernel call
        log.warning("kernel tuning cache lookup failed (%s); tuning instead", e)
        return None


def store(device: torch.device, kernel: str, key: tuple, value: Any) -> None:
    """Store the JSON value for ``kernel``'s ``key`` on ``device`` (no-op where the cache is off)."""
    try:
        if (cache := _cache_for(device)) is not None:
            cache.put(kernel, _key_str(key), value)
    except Exception as e:  # noqa: BLE001 - a cache problem must never fail a kernel call
        log.warning("kernel tuning cache store failed (%s)", e)


def choose(device: torch.device, kernel: str, key: tuple, choices: Sequence[T],
           encode: Callable[[T], Any] = config_to_json) -> T | None:
    """The member of ``choices`` whose ``encode`` is stored for ``key``; None on a miss, also when
    the stored value encodes none of them (a bad or stale entry: it is tuned again)."""
    hit = lookup(device, kernel, key)
    if hit is None:
        return None
    found = next((c for c in choices if encode(c) == hit), None)
    if found is None:
        log.debug("cached %s tuning for %s matches no candidate: %r", kernel, key, hit)
    return found


_UNTIMED: dict[tuple, Any] = {}  # (device, kernel, key) -> what untimed_pick answered (per process)


def untimed_pick(device: torch.device, kernel: str, key: tuple, choices: Sequence[T] | Callable[[], Sequence[T]],
                 default: T, encode: Callable[[T], Any] = config_to_json) -> T:
    """For a call that must not time (inside kernels.tuning.untuned(), a graph capture): the cached or
    shipped pick for ``key`` when there is one, else ``default``. ``choices`` may be a function (built
    only on the first call of a key). The answer is remembered per key for this process (untimed calls
    sit on the per-layer path), apart from the caller's own tuned picks, which take precedence."""
    memo = (str(device), kernel, key)
    if memo not in _UNTIMED:
        cands = choices() if callable(choices) else choices
        _UNTIMED[memo] = (choose(device, kernel, key, cands, encode) if len(cands) > 1 else None) or default
    return _UNTIMED[memo]


def safe_tune(kernel: str, key: tuple, tune: Callable[[], T | None]) -> T | None:
    """``tune()``, or None (logged) when it runs out of device memory or no candidate runs."""
    try:
        return tune()
    except (torch.OutOfMemoryError, RuntimeError) as e:  # NoCandidate is a RuntimeError
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("tuning %s for %s failed (%s): running its default config", kernel, key,
                    str(e).split("\n")[0][:200])
        return None


def tuned(device: torch.device, kernel: str, key: tuple, choices: Sequence[T],
          tune: Callable[[], T | None], encode: Callable[[T], Any] = config_to_json) -> T | None:
    """The cached pick among ``choices`` for ``key``, else ``tune()``'s (stored unless None).

    A single choice is neither looked up nor stored: there is nothing to choose. A tuning that fails
    (no candidate ran, or its scratch did not fit: under ``--vram-budget`` the allocator is capped and a
    long prompt's prefill leaves little room) gives None, logged, and nothing is stored: the caller runs
    its default config, and a later process tunes again."""
    if len(choices) < 2:
        return tune()
    best = choose(device, kernel, key, choices, encode)
    if best is None and (best := safe_tune(kernel, key, tune)) is not None:
        store(device, kernel, key, encode(best))
    return best
