"""A pass's small host tensors (token ids, positions, lengths, block tables) onto the GPU through pinned memory.

A copy from pageable host memory is staged by the driver while the host waits, and the copy engine it
needs is busy with the streamed layers' weights, queued ahead of it: at a served step's start such copies
took ~0.4 ms of host time (session 23's decode trace), on the path the pass's first streamed layers wait
for. From pinned memory the copy is queued and the host goes on.

The pinned memory is one buffer taken at the first upload (:class:`PinnedRing`), not a block of PyTorch's pinned
allocator per copy: that allocator keeps a block until the copies reading it are done and allocates (page-locks)
a new one when none of the size is free, and a server's first 16-request burst met that: its second pass spent
41 ms of host time in 48 ``pin_memory`` calls, a later burst's same pass 2 ms in 45 (H100, session 55, under
cProfile: bench/results/2026-12-07-h100-s55/call3/). Tensors too large for the ring still take that path, and all
do under ``LAYERSTREAM_PINNED_RING=0`` (read once: an A/B of the two in one machine's processes).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from engine.switches import switch_on

RING = switch_on("LAYERSTREAM_PINNED_RING")  # off: every upload pins through PyTorch's allocator, as before
RING_BYTES = 64 << 20  # two halves of 32 MiB: a served pass uploads tens of small tensors (KBs each) and, where the
# embedding table stays in host memory, each unit's rows (a 2,048-row unit of the 7B: 14.7 MB)
ALIGN = 64  # bytes: every staged tensor starts on a multiple (any dtype's alignment)


class PinnedRing:
    """Pinned host memory that small host tensors pass through on their way to a GPU, in two halves used in turn.

    Tensors are staged one after the other in the current half; when one does not fit, an event is recorded on
    every stream that queued a copy from that half, and the other half is taken after its own events (recorded
    when it was left, one half of staging ago) have passed. So the host waits only when it runs a whole half
    (32 MiB of uploads) ahead of the device, and no staged bytes are overwritten before their copy has run.
    A caller queues its copy right after :meth:`take` / :meth:`stage` returns, before anything else is staged (the
    engine thread does all of a server's uploads); the lock keeps only the bookkeeping whole. ``stream`` / ``event``
    are the current-stream lookup and the event recorder (tests pass stand-ins)."""

    def __init__(self, nbytes: int = RING_BYTES, buffer: torch.Tensor | None = None,
                 stream: Callable[[torch.device], object] | None = None,
                 event: Callable[[object], object] | None = None) -> None:
        assert nbytes >= 2 * ALIGN and nbytes % (2 * ALIGN) == 0, nbytes
        self.buf = buffer if buffer is not None else torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        assert self.buf.dtype == torch.uint8 and self.buf.numel() == nbytes, (self.buf.dtype, self.buf.numel())
        self.half = nbytes // 2
        self.part = self.fill = 0
        self.readers: list[set] = [set(), set()]  # streams that queued copies from each half since it was taken
        self.done: list[list] = [[], []]  # events to pass before a half is written again
        self.switches = 0
        self._stream = stream or torch.cuda.current_stream
        self._event = event or _record
        self._lock = threading.Lock()

    def stage(self, t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """``t``'s values in the ring (a view of it, same shape and dtype) for a copy to ``device`` queued on its
        current stream right after; None if ``t`` is larger than a half (the caller pins it the usual way)."""
        view = self.take(t.shape, t.dtype, device)
        if view is not None:
            view.copy_(t)
        return view

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """An unfilled contiguous ``shape`` x ``dtype`` view of the ring, for the caller to fill and copy to
        ``device`` on its current stream right after (before anything else is staged); None if larger than a half."""
        n = math.prod(shape) * dtype.itemsize
        if n > self.half:
            return None
        with self._lock:
            if self.fill + n > self.half:
                self._switch()
            a = self.part * self.half + self.fill
            self.fill += -(-n // ALIGN) * ALIGN
            self.readers[self.part].add(self._stream(device))
            return self.buf[a: a + n].view(dtype).view(shape)

    def _switch(self) -> None:
        self.done[self.part] = [self._event(s) for s in self.readers[self.part]]
        self.readers[self.part] = set()
        self.part, self.fill = 1 - self.part, 0
        self.switches += 1
        for ev in self.done[self.part]:
            ev.synchronize()  # its copies ran a whole half of staging ago: passed already, unless the host ran ahead
        self.done[self.part] = []


def _record(stream) -> torch.cuda.Event:
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


_RING: PinnedRing | None = None
_RING_LOCK = threading.Lock()


def _ring_for(device: torch.device) -> PinnedRing | None:
    """The ring, for a copy to ``device`` queued now; None where uploads pin through PyTorch's allocator instead (the
    ring switched off, not CUDA, or inside a CUDA graph's capture, which would replay the copy from the ring's bytes
    of that moment)."""
    global _RING
    if not RING or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    if _RING is None:
        with _RING_LOCK:
            if _RING is None:
                _RING = PinnedRing()
    return _RING


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` in pinned memory, ready for a non-blocking copy to ``device`` on its current stream."""
    ring = _ring_for(device)
    host = ring.stage(t, device) if ring is not None else None
    return host if host is not None else t.pin_memory()


def staged(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A pinned host tensor to fill and then copy to ``device`` (``.to(device, non_blocking=True)``, at once, on its
    current stream), so that a host result is written where the copy reads it (no second host copy); None where
    :func:`upload` would not go through the ring (see :func:`_ring_for`; larger than half the ring)."""
    ring = _ring_for(device)
    return ring.take(shape, dtype, device) if ring is not None else None


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a GPU through a pinned copy, without the host waiting."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return _pinned(t, device).to(device, non_blocking=True)


def upload_list(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list of ints as a ``dtype`` tensor on ``device`` (see :func:`upload`)."""
    return upload(torch.tensor(values, dtype=dtype), device)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; from the host into a GPU tensor through a pinned copy, without the host waiting."""
    if dst.device.type == "cuda" and src.device.type == "cpu":
        src = _pinned(src, dst.device)
    dst.copy_(src, non_blocking=True)
