"""The weight streamer: resident units in VRAM, streamed units through staging slots.

Streamed units are consumed in the same order every pass, so unit g of the endless sequence
goes to slot ``g % num_slots``. A copy stream fills the slots; per slot a *ready* event
(recorded after the copy; the compute stream waits on it) and a *free* event (recorded when
the compute stream has been given all work reading the slot; the copy stream waits on it
before overwriting). When unit g is released, the copy of unit g + num_slots is issued at
once, which keeps the copy engine busy across unit and pass boundaries (weights do not depend
on the tokens). No host synchronisation is needed. A caller that queues host-to-device copies of its
own between uses (a prefill's prompt states) can ``meter`` the streamer: its copies, in pieces, are
then issued in shares (``pump_to``) between the caller's, or at the latest when the unit is acquired.
A caller with memory to spare for a pass can lend buffers for some units (``lend``, streamer.lent): their
copies go out early and the ring skips them until ``take_back``.

The streamer knows units only as byte buffers (``streamer.units.UnitSpec``); what the bytes
mean is the caller's business.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from streamer.files import SpanReader
from streamer.lent import LentBuffers
from streamer.host import DISK_RING, DiskReader, pack_all, upload_all, upload_workers
from streamer.pinning import PinnedSet
from streamer.sync import Sync, SyncLog
from streamer.trace import Tracer
from streamer.units import UnitSpec

log = logging.getLogger(__name__)


@dataclass
class _Copy:
    """Unit g of the endless sequence (streamed unit j) into ``slot``: its pieces, ``done`` of them issued."""

    g: int
    j: int
    slot: int
    src: torch.Tensor
    pieces: list[tuple[int, int]]
    done: int = 0


class WeightStreamer:
    """Loads ``resident`` units into one device buffer and streams ``streamed`` units, in order, forever."""

    def __init__(self, resident: Sequence[UnitSpec], streamed: Sequence[UnitSpec], num_slots: int, slot_bytes: int,
                 device: torch.device | str, threads: int = 8, progress: Callable[[int], None] | None = None,
                 log_sync: SyncLog | None = None, trace: bool = False) -> None:
        self.device = torch.device(device)
        self.units, self.slot_bytes = list(streamed), slot_bytes
        self.order = list(range(len(self.units)))  # the units of one pass, in use order (see set_order)
        # while metered, a unit is copied in pieces of this many bytes (0: one copy), so that other streams'
        # host-to-device copies (a prefill's prompt states) queue behind one piece, not behind a whole layer;
        # 8 MiB is what the H200 prefill runs measured (bench/results/2026-12-02-h200-s15); unmetered: one copy
        self.piece = int(float(os.environ.get("LAYERSTREAM_COPY_PIECE_MB", "8")) * (1 << 20))
        self.metered = False
        assert all(u.nbytes <= slot_bytes for u in self.units), "a streamed unit exceeds the slot size"
        assert not self.units or num_slots >= 2, "streaming needs at least two staging slots"
        self.num_slots = num_slots if self.units else 0
        self.reader = SpanReader()
        self.sync = Sync(self.device, log_sync)
        self.tracer = Tracer(self.sync) if trace and self.sync.cuda else None
        self._progress = progress or (lambda n: None)
        self.lent = LentBuffers(self.sync)
        self.resident_views = self._load_resident(list(resident), threads)
        self.streamed_bytes = 0  # bytes of the units acquired so far: what crossed to the device for use
        self._load_streamed(threads)
        self._start_pipeline()

    # ----- loading -----
    def _load_resident(self, units: list[UnitSpec], threads: int) -> list[torch.Tensor]:
        """Every resident unit's bytes in one device allocation; one flat view per unit."""
        self.resident_buf = torch.empty(sum(u.nbytes for u in units), dtype=torch.uint8, device=self.device)
        starts = [sum(u.nbytes for u in units[:k]) for k in range(len(units))]
        views = [self.resident_buf[p:p + u.nbytes] for p, u in zip(starts, units)]
        fills = {k: (lambda buf, u=u: self.reader.fill(u, buf, parallel=True)) for k, u in enumerate(units)}
        if self.device.type == "cuda":
            upload_all(fills, dict(enumerate(views)), upload_workers(threads, len(units)), self._progress)
        else:  # the views are host memory: fill them in place
            pack_all(fills, {k: u.nbytes for k, u in enumerate(units)}, None, threads, self._progress,
                     into=dict(enumerate(views)))
        return views

    def _load_streamed(self, threads: int) -> None:
        pinned = {j: (lambda buf, u=u: self.reader.fill(u, buf, parallel=True)) for j, u in enumerate(self.units)
                  if u.tier == "pinned"}
        sizes = {j: u.nbytes for j, u in enumerate(self.units)}
        self.pins = PinnedSet() if self.sync.cuda else None
        self.host_bufs = pack_all(pinned, sizes, self.pins, threads=threads, progress=self._progress)
        self.disk = self._disk_reader() if len(pinned) < len(self.units) else None

    def _disk_reader(self) -> DiskReader:
        return DiskReader(DISK_RING, self.slot_bytes, pin=True)

    # ----- the pipeline -----
    def _start_pipeline(self) -> None:
        n = self.num_slots
        if not hasattr(self, "slots"):  # kept across restarts: captured decode graphs read these addresses
            self.slots = torch.empty((n, self.slot_bytes), dtype=torch.uint8, device=self.device)
        self.ready = [self.sync.event() for _ in range(n)]
        self.free = [self.sync.event() for _ in range(n)]
        self.issued = 0  # units whose copy has been issued (or queued, see meter)
        self.consumed = 0  # units acquired by the compute side
        self.queued: deque[_Copy] = deque()  # units whose pieces are not all on the copy stream yet
        self.pieces_issued, self._mark = 0, (0, 0)
        self.skipped: set[int] = set()  # units g of the sequence not copied into their slot: lent ones
        if not self.order:  # a pass that streams nothing (every unit it uses is elsewhere)
            return
        for g in range(n):
            self._request_read(g)
        for _ in range(n):
            self._issue_next()

    def set_order(self, order: Sequence[int]) -> None:
        """Stream the units ``order`` (indices into the streamed units) each pass from now on, e.g. a
        pass that computes some units elsewhere; a change drains and restarts the pipeline."""
        order = list(order)
        assert all(0 <= j < len(self.units) for j in order), order
        if order != self.order:
            self.order = order
            self.reset()

    def _request_read(self, g: int) -> None:
        j = self.order[g % len(self.order)]
        if self.disk is not None and j not in self.host_bufs:
            unit = self.units[j]
            self.disk.request(g, lambda buf: self.reader.fill(unit, buf, parallel=True, drop_cache=True))

    def _issue_next(self) -> None:
        g, n = self.issued, self.num_slots
        j, slot = self.order[g % len(self.order)], g % n
        unit = self.units[j]
        src = self.host_bufs.get(j)
        if src is None:
            src = self.disk.get(g)
        self._request_read(g + n)  # unit g + n may come from disk even when unit g is pinned
        if j in self.lent:  # its bytes are in a lent buffer: the slot stays as it is
            self.skipped.add(g)
            self.issued += 1
            self.sync.note("skip", g, slot)
            return
        step = (self.piece if self.metered else 0) or unit.nbytes
        self.queued.append(_Copy(g, j, slot, src, [(a, min(unit.nbytes, a + step)) for a in range(0, unit.nbytes, step)]))
        self.issued += 1
        if not self.metered:
            self._issue()

    def _issue(self, pieces: int | None = None, upto: int | None = None) -> None:
        """Put up to ``pieces`` (None: all) queued pieces on the copy stream, in order (only units <= ``upto``)."""
        pieces = math.inf if pieces is None else pieces
        if not (pieces > 0 and self.queued and (upto is None or self.queued[0].g <= upto)):
            return  # the common metered call: nothing due (no stream switch)
        with self.sync.on_copy_stream():  # once per call: a stream switch costs as much as a piece's copy call
            while pieces > 0 and self.queued and (upto is None or self.queued[0].g <= upto):
                c = self.queued[0]
                if c.done == 0:
                    self.sync.copy_stream.wait_event(self.free[c.slot])
                    if self.tracer:
                        self.tracer.begin("copy", self.units[c.j].name, self.sync.copy_stream)
                n = min(len(c.pieces) - c.done, pieces)
                for a, b in c.pieces[c.done:c.done + n]:
                    self.slots[c.slot, a:b].copy_(c.src[a:b], non_blocking=True)
                c.done += n
                pieces -= n
                self.pieces_issued += n
                if c.done == len(c.pieces):
                    self._issued(c)

    def _issued(self, c: _Copy) -> None:
        """Unit ``c``'s last piece is on the copy stream (called there): mark it ready and drop it from the queue."""
        self.ready[c.slot].record(self.sync.copy_stream)
        if self.tracer:
            self.tracer.end("copy", self.units[c.j].name, self.sync.copy_stream)
        if self.disk is not None and c.j not in self.host_bufs:
            done = self.sync.event()
            done.record(self.sync.copy_stream)
            self.disk.copied(c.g, done)
        self.sync.note("copy", c.g, c.slot)
        self.queued.popleft()

    def meter(self, on: bool) -> None:
        """While on, units' copies wait in a queue until ``pump_to`` (or the unit's ``acquire``) issues them,
        so a caller interleaves them with its own host-to-device copies (a prefill's prompt states)
        rather than finding a whole layer's copy queued ahead of each of its own. Off: all are issued."""
        self.metered = on
        if not on:
            self._issue()

    def pump_start(self) -> None:
        """Mark the queue's pieces now as the ones ``pump_to`` shares out."""
        self._mark = (self.pieces_issued, sum(len(c.pieces) - c.done for c in self.queued))

    def pump_to(self, fraction: float) -> None:
        """Issue queued pieces until ``fraction`` of those marked by ``pump_start`` have been issued."""
        base, total = self._mark
        want = base + math.ceil(total * min(1.0, fraction) - 1e-9)
        self._issue(want - self.pieces_issued)

    def acquire(self, j: int) -> int:
        """Wait (on the compute stream) for streamed unit ``j``; returns the slot that holds it.

        Units must be acquired in order; out of order (a pass was interrupted) the pipeline restarts.
        """
        slot, lent = self._acquire(j)
        assert lent is None, "a unit with lent pieces is read through acquire_pieces"
        return slot

    def acquire_pieces(self, j: int) -> list[torch.Tensor]:
        """As :meth:`acquire`, but returns unit ``j``'s bytes: its slot's, or the pieces lent for it (``lend``)."""
        slot, lent = self._acquire(j)
        return [self.slots[slot][: self.units[j].nbytes]] if lent is None else lent

    def _acquire(self, j: int) -> tuple[int, list[torch.Tensor] | None]:
        assert self.order, "this pass streams no unit (set_order)"
        if self.order[self.consumed % len(self.order)] != j:
            log.warning("streamer out of order (unit %d of the pass, got unit %d): restarting", self.consumed, j)
            self.reset()
        slot, lent = self.consumed % self.num_slots, None
        self.streamed_bytes += self.units[j].nbytes
        if self.consumed in self.skipped:
            self.skipped.discard(self.consumed)
            lent = self.lent.wait(j, self.host_bufs)
        else:
            self._issue(upto=self.consumed)  # its own pieces, if still queued
            self.sync.compute_stream().wait_event(self.ready[slot])
        self.sync.note("wait", self.consumed, slot)
        if self.tracer:
            self.tracer.begin("compute", self.units[j].name, self.sync.compute_stream())
        return slot, lent

    def lend(self, j: int, pieces: list[torch.Tensor]) -> bool:
        """Lend ``pieces`` (flat uint8 device views, in order, together unit ``j``'s size) for pinned unit ``j`` until
        :meth:`take_back`: its copies go out behind the ring's next ones and the ring skips the unit
        (streamer.lent). False, and nothing lent, when its next use is already on its way into a slot, or it is
        not pinned."""
        unit = self.units[j]
        assert sum(p.numel() for p in pieces) == unit.nbytes
        assert all(p.dtype == torch.uint8 and p.dim() == 1 and p.device.type == self.device.type for p in pieces)
        if j not in self.host_bufs or j in self.lent or not self.order:
            return False
        on_way = (self.order[g % len(self.order)] for g in range(self.consumed, self.issued))
        if any(k == j for k in on_way):
            return False
        self.lent.add(j, list(pieces))
        return True

    def take_back(self) -> None:
        """Take the lent buffers back (after the pass that read them): the ring copies those units again. A unit
        skipped but not read yet (an interrupted pass) has no bytes in its slot: the pipeline restarts."""
        if not self.lent:
            return
        self.lent.drop()
        if self.skipped:
            self.reset()

    def release(self) -> None:
        """The compute stream has been given all work reading the last acquired unit."""
        slot = self.consumed % self.num_slots
        if self.tracer:
            self.tracer.end("compute", self.units[self.order[self.consumed % len(self.order)]].name,
                            self.sync.compute_stream())
        self.free[slot].record(self.sync.compute_stream())
        self.sync.note("free", self.consumed, slot)
        self.consumed += 1
        self._issue_next()
        if not self.metered:
            self.lent.issue(self.host_bufs, count=1)  # one lent unit's copy behind each ring copy: the engine has time

    def reset(self) -> None:
        """Drain and restart the pipeline at unit 0 (after an aborted pass)."""
        if self.sync.cuda:
            torch.cuda.synchronize(self.device)
        if self.disk is not None:
            self.disk.close()
            self.disk = self._disk_reader()
        self._start_pipeline()

    def close(self) -> None:
        """Stop the disk reader, close the files and unlock the host buffers (after pending copies)."""
        if self.sync.cuda:
            torch.cuda.synchronize(self.device)
        if self.disk is not None:
            self.disk.close()
        self.reader.close()
        if self.pins is not None:
            self.pins.release()
