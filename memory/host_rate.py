"""The host's GEMV rate: how fast the CPU reads a layer's weights in a decode-sized matmul.

The host lane (``memory.host_lane``) predicts a host layer's time as its bytes over this rate, so it
is measured on *this* machine, at the plan's batch and compute dtype, with torch's CPU matmul
(``F.linear`` of ``batch`` rows against a weight matrix larger than the caches), and cached next to
the H2D figure (``memory.bandwidth``: the same JSON file, written atomically) keyed by the CPU
model, the thread count, the dtype and the batch.

On a GPU machine the rate is measured while pinned host-to-device copies run (``contend``), as they do
while the host lane works: the two share the memory bus. On the H200 host the GEMV alone measured
70.6 GB/s while the host lane, planned with it, achieved 48 GB/s next to the streamer's copies, and
its steps came out 1.46x the prediction (bench/results/2026-12-01-h200-s7-serve-hostlane).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from memory.bandwidth import default_cache_path, load_cache, save_cache_entry

log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()`` elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key(batch: int, dtype: torch.dtype, threads: int, contended: bool = False) -> str:
    """Cache key of a host GEMV rate (``contended``: measured next to host-to-device copies)."""
    return (f"host gemv: {cpu_name()} x{threads} threads, {str(dtype).removeprefix('torch.')}, batch {batch}"
            + (", under H2D copies" if contended else ""))


@contextlib.contextmanager
def h2d_traffic(device: torch.device, nbytes: int = 128 << 20) -> Iterator[None]:
    """While the block runs, a thread keeps pinned host-to-device copies of ``nbytes`` going on a side
    stream of ``device`` (what the streamer does while the host lane computes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stop, copies = threading.Event(), [0]

    def loop() -> None:
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    dst.copy_(src, non_blocking=True)
                    stream.synchronize()
                    copies[0] += 1

    t = threading.Thread(target=loop, name="h2d-traffic", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        log.info("host GEMV measured next to %d host-to-device copies of %d MiB", copies[0], nbytes >> 20)


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The CPU's largest cache in bytes (Linux sysfs; 0 where it cannot be read)."""
    best = 0
    for d in root.glob("index[0-9]*"):
        try:
            text = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * unit)
    return best


def timing_bytes(floor: int) -> int:
    """Bytes of weight for a host rate measurement: ``floor``, or twice the last-level cache where that is more,
    so that repeated calls read memory as the lane's layers do, not a cache that holds the whole weight (the
    GPU machines' hosts show 300 MiB of L3 to their VM)."""
    return max(floor, 2 * last_level_cache_bytes())


def gemv_gbps(w: torch.Tensor, x: torch.Tensor, repeats: int) -> float:
    """GB/s of ``w``'s bytes read by ``F.linear(x, w)``: the median of ``repeats`` timed calls after one warm-up
    (page faults, oneDNN's kernel choice)."""
    F.linear(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - t0)
    return w.numel() * w.element_size() / statistics.median(times) / 1e9


def measure_host_gemv(batch: int, dtype: torch.dtype, nbytes: int | None = None, repeats: int = 5,
                      hidden: int = 4096) -> float:
    """GB/s (10**9 bytes/s) of weight bytes read by ``F.linear(x [batch, hidden], w [rows, hidden])`` on
    the CPU in ``dtype``: ``w`` holds ``nbytes`` (default :func:`timing_bytes` of 256 MiB); the median of
    ``repeats`` timed calls after one warm-up."""
    nbytes = timing_bytes(256 << 20) if nbytes is None else nbytes
    if batch < 1 or nbytes <= 0 or repeats <= 0:
        raise ValueError(f"batch, nbytes and repeats must be positive, got {batch}, {nbytes}, {repeats}")
    rows = max(1, nbytes // (hidden * dtype.itemsize))
    gen = torch.Generator().manual_seed(0)
    # a pattern, not random numbers: the GEMV reads every byte either way, and drawing 128M of them took 0.85 s
    # of a first run's 0.93 s measurement on a 2-core machine
    w = (torch.arange(hidden, dtype=torch.float32) % 7 * 0.01 - 0.03).to(dtype).expand(rows, hidden).contiguous()
    x = torch.randn((batch, hidden), generator=gen).to(dtype)
    gbps = gemv_gbps(w, x, repeats)
    log.info("measured host GEMV: %.1f GB/s (batch %d, %s, %d threads)", gbps, batch, dtype, torch.get_num_threads())
    return gbps


def host_gemv_rate(batch: int, dtype: torch.dtype, cache_path: str | Path | None = None,
                   remeasure: bool = False, contend: torch.device | None = None, form: str = "",
                   measure: Callable[[int, torch.dtype], float] | None = None) -> tuple[float, str]:
    """``(GB/s, source)`` of the host GEMV at ``batch`` in ``dtype`` with torch's current thread count;
    ``source`` is ``"measured now"`` or ``"cached from <date>"``. Measured once per machine (see the
    module docstring), next to host-to-device copies to ``contend`` when given; ``remeasure`` ignores the
    cache. ``measure(batch, dtype)`` times another weight form (e.g. int4 layers through torch's CPU int4
    kernel, engine.host_int4), cached under its own ``form`` name; default: the dense matmul."""
    path = _path(cache_path)
    key = _entry(batch, dtype, torch.get_num_threads(), contend is not None, form)
    cache = load_cache(path)
    lane, hit = cache.get(key + ACHIEVED), cache.get(key)
    if lane is not None and not remeasure:  # what the lane itself did here beats the micro-benchmark
        return float(lane["gbps"]), f"achieved by the host lane on {lane.get('measured_at', 'an unknown date')}"
    if hit is not None and not remeasure:
        return float(hit["gbps"]), f"cached from {hit.get('measured_at', 'an unknown date')}"
    with h2d_traffic(contend) if contend is not None else contextlib.nullcontext():
        gbps = (measure or measure_host_gemv)(batch, dtype)
    save_cache_entry(path, key, gbps)
    return gbps, "measured now"


ACHIEVED = ", achieved by the host lane"  # suffix of the entry a run's host lane leaves (record_achieved)


def record_achieved(batch: int, dtype: torch.dtype, threads: int, gbps: float, form: str = "",
                    cache_path: str | Path | None = None) -> None:
    """Keep the rate a run's host lane achieved (host-layer bytes over the worker's time in them from the hidden
    state's arrival, norms and attention included, next to the streamer's copies; session 38 stopped counting the
    worker's wait for the GPU's earlier work in it) for the next plan of this machine, batch, dtype,
    thread count and weight form: the micro-benchmark read 36.7 GB/s on an H200 host whose lane then did
    29-34 GB/s, and the step model replays traced steps within 1.3% given the lane's own per-layer time
    (tools/lane_trace.py on bench/results/2026-12-01-h200-s9/call1)."""
    if not gbps > 0:
        raise ValueError(f"an achieved host rate must be positive, got {gbps}")
    save_cache_entry(_path(cache_path), _entry(batch, dtype, threads, True, form) + ACHIEVED, gbps)


def _path(cache_path: str | Path | None) -> Path:
    return Path(cache_path) if cache_path is not None else default_cache_path()


def _entry(batch: int, dtype: torch.dtype, threads: int, contended: bool, form: str) -> str:
    """The cache entry of a rate: :func:`host_key` and the weight form (``""``: the dense matmul)."""
    return host_key(batch, dtype, threads, contended) + (f", {form}" if form else "")
