"""Host-side sources of streamed weights: a pinned cache, or the mapped file via a reader ring.

Pinned tier: each streamed layer is packed once (in parallel threads) into its own
contiguous host buffer, page-locked in place right after (streamer.pinning), so sending it
to the GPU is a single async copy.
Disk tier: background threads pack a layer straight from the memory-mapped
safetensors (which reads the disk) into one of a few ring buffers (page-locked the same
way, by the reader thread), ahead of the copy stream; a ring buffer is refilled only
after its last copy has finished.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from streamer.pinning import PinnedSet
from streamer.units import Packer

log = logging.getLogger(__name__)

def pack_all(packers: dict[int, Packer], nbytes: dict[int, int], pins: PinnedSet | None, threads: int,
             progress: Callable[[int], None] | None = None,
             into: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Fill one host buffer per unit, in parallel (allocated here unless ``into`` gives them);
    returns unit -> buffer.

    With ``pins`` every buffer is page-locked through it once filled (in the same worker
    thread); the caller releases ``pins`` when done with the buffers.
    """
    bufs: dict[int, torch.Tensor] = {}

    def work(u: int) -> int:
        buf = into[u] if into is not None else torch.empty(nbytes[u], dtype=torch.uint8)
        packers[u](buf)
        bufs[u] = buf if pins is None else pins.pin(buf)
        return nbytes[u]

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done in pool.map(work, list(packers)):
            if progress is not None:
                progress(done)
    return bufs


UPLOAD_WORKERS = 4  # at most this many threads upload the resident units, each through a bounce buffer of its own


def upload_workers(threads: int, units: int) -> int:
    """Threads :func:`upload_all` runs for ``units`` resident units given ``threads`` loading threads."""
    return max(1, min(threads, UPLOAD_WORKERS, units))


def bounce_bytes(unit_bytes: list[int], threads: int) -> int:
    """Host bytes the pinned bounce buffers of an upload of units of ``unit_bytes`` take (one of the largest
    unit's size per worker; freed when the upload returns, before the pinned tier is filled)."""
    return upload_workers(threads, len(unit_bytes)) * max(unit_bytes) if unit_bytes else 0


def upload_all(packers: dict[int, Packer], dests: dict[int, torch.Tensor], threads: int,
               progress: Callable[[int], None] | None = None) -> None:
    """Fill each unit and copy it into its flat uint8 device view ``dests[u]``, in parallel.

    Each worker packs into a bounce buffer of its own, page-locked once (streamer.pinning), and
    copies it out on a CUDA stream of its own, so reading the files and the host-to-device copies
    of several units overlap. Returns when every copy has finished.
    """
    size = max((d.numel() for d in dests.values()), default=0)
    device = next(iter(dests.values())).device if dests else None
    pins, local = PinnedSet(), threading.local()

    def work(u: int) -> int:
        if not hasattr(local, "bounce"):
            local.bounce = pins.pin(torch.empty(size, dtype=torch.uint8))
            local.stream = torch.cuda.Stream(device)
        n = dests[u].numel()
        packers[u](local.bounce[:n])
        with torch.cuda.stream(local.stream):
            dests[u].copy_(local.bounce[:n], non_blocking=True)
        local.stream.synchronize()  # the bounce buffer is refilled next
        return n

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for done in pool.map(work, list(packers)):
                if progress is not None:
                    progress(done)
    finally:
        pins.release()


DISK_RING = 3  # the disk tier's ring buffers of one staging slot each (memory.placement reserves them in RAM)


class DiskReader:
    """Reads disk-tier units into a ring of pinned buffers, in unit order, ahead of use.

    ``request(g, packer)`` queues unit g (the g-th streamed unit overall); ``get(g)``
    blocks until its bytes are in a ring buffer and returns it; ``copied(g, event)``
    tells the reader when the device copy from that buffer is done, so it may be reused.
    """

    def __init__(self, ring: int, nbytes: int, pin: bool) -> None:
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(ring)]
        self.pins = PinnedSet() if pin and torch.cuda.is_available() else None
        self.free_events: list = [None] * ring
        self.available = [threading.Event() for _ in range(ring)]
        for a in self.available:
            a.set()
        self.ready: dict[int, threading.Event] = {}
        self.slot_of: dict[int, int] = {}
        self.todo: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.next_ring = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name="disk-reader")
        self.thread.start()

    def request(self, g: int, packer: Packer) -> None:
        with self.lock:
            r = self.next_ring
            self.next_ring = (r + 1) % len(self.bufs)
            self.slot_of[g] = r
            self.ready[g] = threading.Event()
        self.todo.put((g, r, packer))

    def _run(self) -> None:
        if self.pins is not None:  # page-locked here, before any get(): off the loading thread
            self.bufs = [self.pins.pin(b) for b in self.bufs]
        while True:
            item = self.todo.get()
            if item is None:
                return
            g, r, packer = item
            self.available[r].wait()  # the main thread has issued the copy out of this buffer
            self.available[r].clear()
            try:
                ev = self.free_events[r]
                if ev is not None:
                    ev.synchronize()  # the previous copy out of this buffer has finished
                packer(self.bufs[r])
            except BaseException as e:  # surfaced to the caller in get()
                self.errors.append(e)
            self.ready[g].set()

    def get(self, g: int) -> torch.Tensor:
        self.ready[g].wait()
        if self.errors:
            raise RuntimeError(f"reading streamed weights from disk failed: {self.errors[0]}") from self.errors[0]
        return self.bufs[self.slot_of[g]]

    def copied(self, g: int, event) -> None:
        with self.lock:
            r = self.slot_of.pop(g)
            self.ready.pop(g)
            self.free_events[r] = event
        self.available[r].set()

    def close(self) -> None:
        """Stop the reader thread and unlock the ring (no copy out of it may still be in flight)."""
        self.todo.put(None)
        self.thread.join(timeout=5)
        if self.pins is not None:
            self.pins.release()
