"""Host-to-device and disk read bandwidth: measured once per machine, cached on disk.

The planner predicts a decode step as (bytes streamed per step) / (pinned H2D bandwidth),
so the bandwidth of *this* GPU slot matters (PCIe generation, lane count, NUMA node).
It is measured with a pinned buffer and CUDA events and cached in a small JSON file keyed
by GPU name + PCI bus id, under ``$XDG_CACHE_HOME/layerstream/bandwidth.json``
(default ``~/.cache/layerstream/``). The cache is written atomically (temp file in the same
directory, then ``os.replace``); an unwritable cache only logs a warning.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_H2D_GBPS = 25.0
DEFAULT_SOURCE = "default (no CUDA): 25 GB/s (PCIe 4.0 x16)"
CACHE_VERSION = 1
# The engine's once-per-machine measurement: 256 MiB copies (5 ms each on PCIe 5) are long enough for the
# copy engine's steady rate, and pinning 256 MiB instead of 1 GiB keeps it off a first run's clock (a
# profiled first run on the H200 spent 0.67 s in it). The benchmarks' bounds keep 1 GiB.
PLAN_MEASURE_BYTES = 256 << 20


def default_cache_path() -> Path:
    """``$LAYERSTREAM_CACHE/bandwidth.json``, else ``$XDG_CACHE_HOME/layerstream/bandwidth.json``, else
    ``~/.cache/layerstream/bandwidth.json``: the measured rates (host-to-device copies, the host lane's) live with
    the tuning and packed-layer caches. (They ignored ``LAYERSTREAM_CACHE`` before session 40, so a run given a
    fresh cache directory, e.g. ``tools.bench_startup``'s first run, still found the rates of earlier runs.)"""
    if root := os.environ.get("LAYERSTREAM_CACHE"):
        return Path(root).expanduser() / "bandwidth.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerstream" / "bandwidth.json"


def measure_h2d(device: torch.device | str | int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Pinned host-to-device copy bandwidth in GB/s (10**9 bytes/s): the median of ``repeats`` timed copies.

    CUDA only (raises ValueError otherwise). One untimed warm-up copy precedes the timed ones;
    each copy is timed with CUDA events on the current stream of ``device``.
    """
    device = _as_device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"measure_h2d needs a CUDA device, got {device}; on CPU use h2d_bandwidth() for a default")
    if nbytes <= 0 or repeats <= 0:
        raise ValueError(f"nbytes and repeats must be positive, got nbytes={nbytes}, repeats={repeats}")
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    with torch.cuda.device(device):
        dst.copy_(src, non_blocking=True)  # warm-up: page-table setup, clocks
        torch.cuda.synchronize(device)
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    del dst, src
    torch.cuda.empty_cache()  # hand the buffer back: it must not linger inside the engine's budget
    seconds = statistics.median(times)
    assert seconds > 0, "CUDA events reported a zero-length copy"
    gbps = nbytes / seconds / 1e9
    log.info("measured pinned H2D bandwidth on %s: %.1f GB/s (%d x %d bytes)", device, gbps, repeats, nbytes)
    return gbps


def h2d_bandwidth(device: torch.device | str | int, cache_path: str | Path | None = None,
                  remeasure: bool = False) -> tuple[float, str]:
    """Pinned H2D bandwidth for ``device`` as ``(GB/s, source)``.

    ``source`` is ``"measured now"``, ``"cached from <date>"`` or, without CUDA,
    :data:`DEFAULT_SOURCE`. A measurement is cached per GPU (name + PCI bus id) in
    ``cache_path`` (default :func:`default_cache_path`); ``remeasure`` ignores the cache.
    """
    device = _as_device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_H2D_GBPS, DEFAULT_SOURCE
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = device_key(device)
    entries = load_cache(path)
    hit = entries.get(key)
    if hit is not None and not remeasure:
        return float(hit["gbps"]), f"cached from {hit.get('measured_at', 'an unknown date')}"
    gbps = measure_h2d(device, nbytes=PLAN_MEASURE_BYTES)
    save_cache_entry(path, key, gbps)
    return gbps, "measured now"


def device_key(device: torch.device) -> str:
    """Cache key for a GPU: ``"<name> @ <pci bus id>"`` (bus id via pynvml or torch, when known)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"{props.name} @ {_pci_bus_id(index, props)}"


def _pci_bus_id(index: int, props: object) -> str:
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:  # torch exposes domain/bus/device; pynvml normalises it to its own spelling
        bus_id = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        try:
            import pynvml
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
                raw = pynvml.nvmlDeviceGetPciInfo(handle).busId
                return (raw.decode() if isinstance(raw, bytes) else str(raw)).lower()
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # pynvml missing, no driver access, or a bus id it does not know
            log.debug("pynvml lookup of %s failed (%s); using torch's bus id", bus_id, e)
        return bus_id
    return f"cuda:{index} (bus id unknown)"


def load_cache(path: str | Path) -> dict[str, dict]:
    """The cache's entries (key -> {"gbps", "measured_at", ...}); empty when missing or unreadable."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("ignoring unreadable bandwidth cache %s (%s); it will be rewritten", path, e)
        return {}
    entries = raw.get("entries") if isinstance(raw, dict) and raw.get("version") == CACHE_VERSION else None
    if not isinstance(entries, dict):
        log.warning("ignoring bandwidth cache %s with an unknown format; it will be rewritten", path)
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict) and isinstance(v.get("gbps"), (int, float))}


def save_cache_entry(path: str | Path, key: str, gbps: float) -> bool:
    """Store ``gbps`` for ``key`` atomically; False (with a warning) if the cache cannot be written."""
    path = Path(path)
    entries = load_cache(path)
    entries[key] = {"gbps": round(float(gbps), 3), "measured_at": _dt.date.today().isoformat(),
                    "torch": torch.__version__}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bandwidth-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot write bandwidth cache %s (%s); the bandwidth will be measured again next run", path, e)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def disk_read_bandwidth(path: str | Path, nbytes: int, chunk: int = 16 << 20, drop_cache: bool = True) -> float:
    """Sequential read bandwidth of ``path`` in GB/s, reading its first ``min(nbytes, size)`` bytes.

    Page cache: bytes already cached are served from RAM, so a second run (or a file read
    recently) reports memory bandwidth, not the disk's. With ``drop_cache`` the file's clean
    cached pages are first dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (best effort,
    Linux; pages mapped by another process stay). For a trustworthy figure read a file larger
    than RAM or drop all caches as root (``echo 3 > /proc/sys/vm/drop_caches``) beforehand.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file: give an existing file (e.g. a model shard) to time reads from")
    total = min(int(nbytes), path.stat().st_size)
    if total <= 0:
        raise ValueError(f"nothing to read: nbytes={nbytes}, {path} has {path.stat().st_size} bytes")
    buf = bytearray(min(chunk, total))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        done, start = 0, time.perf_counter()
        while done < total:
            n = f.readinto(view[: min(len(buf), total - done)])
            if not n:
                break
            done += n
        seconds = time.perf_counter() - start
    return done / max(seconds, 1e-9) / 1e9


def _as_device(device: torch.device | str | int) -> torch.device:
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
