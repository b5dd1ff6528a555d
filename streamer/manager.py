"""The weight manager: resident weights in VRAM, streamed weights through staging slots.

Streamed units (streamed decoder layers, then lm_head chunks when lm_head streams) are
consumed in the same order every forward pass, so unit g of the endless sequence goes
to slot ``g % num_slots``. A copy stream fills the slots; per slot a *ready* event
(recorded after the copy; the compute stream waits on it) and a *free* event (recorded
when the compute stream has been given all work reading the slot; the copy stream
waits on it before overwriting). When unit g is released, the copy of unit
g + num_slots is issued at once, which keeps the copy engine busy across layer and step
boundaries (weights do not depend on the tokens). No host synchronisation is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.layout import LayerLayout
from streamer.host import DiskReader, pack_all
from streamer.pinning import PinnedSet
from streamer.sources import Unit, UnitSource
from streamer.sync import Sync, SyncLog
from streamer.trace import Tracer

log = logging.getLogger(__name__)


class WeightManager:
    """Implements ``engine.model.WeightSource`` for a plan from ``memory.planner``."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, plan, device: torch.device | str,
                 dtype: torch.dtype, threads: int = 8, progress=None, log_sync: SyncLog | None = None,
                 trace: bool = False) -> None:
        self.ckpt, self.cfg, self.plan, self.dtype = ckpt, cfg, plan, dtype
        self.device = torch.device(device)
        self.layout = LayerLayout.build(cfg, dtype)
        self.source = UnitSource(ckpt, cfg, self.layout, dtype)
        self.sync = Sync(self.device, log_sync)
        self.tracer = Tracer(self.sync) if trace and self.sync.cuda else None
        self._progress = progress or (lambda n: None)
        self._load_resident()
        self.units = self._make_units()
        self.unit_of = {(u.kind, u.index): j for j, u in enumerate(self.units)}
        self._load_streamed(threads)
        self._start_pipeline()

    # ----- loading -----
    def _load_resident(self) -> None:
        p, dev = self.plan, self.device
        n = len(p.resident_layers)
        self.resident_buf = torch.empty(n * self.layout.nbytes, dtype=torch.uint8, device=dev)
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        for j, i in enumerate(p.resident_layers):
            buf = self.resident_buf[j * self.layout.nbytes:(j + 1) * self.layout.nbytes]
            self.source.pack_mapped(Unit("layer", i, self.layout.nbytes), buf)
            self.resident[i] = self.layout.views(buf)
            self._progress(self.layout.nbytes)
        embed = self.ckpt.tensor("model.embed_tokens.weight")
        self.embed_table = embed.to(dev, self.dtype) if p.embed_on_device else embed
        self.final_norm = self.ckpt.tensor("model.norm.weight").to(dev, self.dtype)
        self.lm_head = None
        if p.lm_head_resident:
            tied_here = self.cfg.tie_word_embeddings and p.embed_on_device
            self.lm_head = (self.embed_table if tied_here
                            else self.ckpt.tensor(self.source.head_name).to(dev, self.dtype))
            self._progress(self.lm_head.numel() * self.lm_head.element_size())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def _make_units(self) -> list[Unit]:
        units = [Unit("layer", i, self.layout.nbytes) for i in self.plan.streamed_layers]
        if not self.plan.lm_head_resident:
            vocab, row_bytes = self.cfg.vocab_size, self.cfg.hidden_size * self.dtype.itemsize
            rows = -(-vocab // self.plan.lm_head_chunks)
            for c in range(self.plan.lm_head_chunks):
                r0 = c * rows
                n = min(rows, vocab - r0)
                units.append(Unit("lm_head", c, n * row_bytes, r0, n))
        assert all(u.nbytes <= self.plan.slot_bytes for u in units), "a streamed unit exceeds the slot size"
        return units

    def _load_streamed(self, threads: int) -> None:
        disk = set(self.plan.disk_layers)
        head_on_disk = not self.plan.lm_head_resident and self.plan.module("lm_head").tier == "disk"
        pinned = {j: (lambda buf, u=u: self.source.pack_mapped(u, buf)) for j, u in enumerate(self.units)
                  if not ((u.kind == "layer" and u.index in disk) or (u.kind == "lm_head" and head_on_disk))}
        sizes = {j: u.nbytes for j, u in enumerate(self.units)}
        self.pins = PinnedSet() if self.sync.cuda else None
        self.host_bufs = pack_all(pinned, sizes, self.pins, threads=threads, progress=self._progress)
        self.disk = DiskReader(3, self.plan.slot_bytes, pin=True) if len(pinned) < len(self.units) else None

    # ----- the pipeline -----
    def _start_pipeline(self) -> None:
        n = self.plan.num_slots if self.units else 0
        if not hasattr(self, "slots"):  # kept across restarts: captured decode graphs read these addresses
            self.slots = torch.empty((n, self.plan.slot_bytes), dtype=torch.uint8, device=self.device)
            self.slot_views: list[dict] = [{} for _ in range(n)]
        self.ready = [self.sync.event() for _ in range(n)]
        self.free = [self.sync.event() for _ in range(n)]
        self.issued = 0  # units whose copy has been issued
        self.consumed = 0  # units acquired by the compute side
        for g in range(n):
            self._request_read(g)
        for _ in range(n):
            self._issue_next()

    def _request_read(self, g: int) -> None:
        if self.disk is not None and (g % len(self.units)) not in self.host_bufs:
            unit = self.units[g % len(self.units)]
            self.disk.request(g, lambda buf: self.source.read_direct(unit, buf))

    def _issue_next(self) -> None:
        g, n = self.issued, len(self.slots)
        j, slot = g % len(self.units), g % n
        unit = self.units[j]
        src = self.host_bufs.get(j)
        if src is None:
            src = self.disk.get(g)
        self._request_read(g + n)  # unit g + n may come from disk even when unit g is pinned
        with self.sync.on_copy_stream():
            self.sync.copy_stream.wait_event(self.free[slot])
            if self.tracer:
                self.tracer.begin("copy", unit, self.sync.copy_stream)
            self.slots[slot, : unit.nbytes].copy_(src[: unit.nbytes], non_blocking=True)
            self.ready[slot].record(self.sync.copy_stream)
            if self.tracer:
                self.tracer.end("copy", unit, self.sync.copy_stream)
        if self.disk is not None and j not in self.host_bufs:
            done = self.sync.event()
            done.record(self.sync.copy_stream)
            self.disk.copied(g, done)
        self.sync.note("copy", g, slot)
        self.issued += 1

    def _acquire(self, kind: str, index: int) -> torch.Tensor:
        j = self.unit_of[(kind, index)]
        if self.consumed % len(self.units) != j:  # an interrupted pass: restart the pipeline
            log.warning("streamer out of order (expected unit %d, got %d): restarting", self.consumed, j)
            self.reset()
        slot = self.consumed % len(self.slots)
        self.sync.compute_stream().wait_event(self.ready[slot])
        self.sync.note("wait", self.consumed, slot)
        if self.tracer:
            self.tracer.begin("compute", self.units[j], self.sync.compute_stream())
        return self.slots[slot]

    def _release(self) -> None:
        slot = self.consumed % len(self.slots)
        if self.tracer:
            self.tracer.end("compute", self.units[self.consumed % len(self.units)], self.sync.compute_stream())
        self.free[slot].record(self.sync.compute_stream())
        self.sync.note("free", self.consumed, slot)
        self.consumed += 1
        self._issue_next()

    def reset(self) -> None:
        """Drain and restart the pipeline at unit 0 (after an aborted forward pass)."""
        if self.sync.cuda:
            torch.cuda.synchronize(self.device)
        if self.disk is not None:
            self.disk.close()
            self.disk = DiskReader(3, self.plan.slot_bytes, pin=True)
        self._start_pipeline()

    # ----- WeightSource -----
    def embed(self, ids: torch.Tensor, lookup=torch.nn.functional.embedding) -> torch.Tensor:
        if self.plan.embed_on_device:
            return lookup(ids.to(self.device), self.embed_table)
        rows = torch.nn.functional.embedding(ids.cpu(), self.embed_table)  # host table: gather on the host
        return rows.to(self.dtype).to(self.device, non_blocking=False)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        if i in self.resident:
            return self.resident[i]
        self._acquire("layer", i)
        return self.slot_layer(self.consumed % len(self.slots))

    def slot_layer(self, slot: int) -> dict[str, torch.Tensor]:
        """Layer-shaped views of staging slot ``slot`` (what ``layer(i)`` returns when i uses it);
        no synchronisation: for capturing graphs that read whichever layer the slot holds."""
        views = self.slot_views[slot].get("layer")
        if views is None:
            views = self.slot_views[slot]["layer"] = self.layout.views(self.slots[slot])
        return views

    def release(self, i: int) -> None:
        if i not in self.resident:
            self._release()

    def norm(self) -> torch.Tensor:
        return self.final_norm

    def lm_head_parts(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.lm_head is not None:
            yield 0, self.lm_head
            return
        for u in self.units:
            if u.kind != "lm_head":
                continue
            buf = self._acquire("lm_head", u.index)
            yield u.row0, buf[: u.nbytes].view(self.dtype).view(u.rows, self.cfg.hidden_size)
            self._release()

    def close(self) -> None:
        """Stop the disk reader, close the files and unlock the host buffers (after pending copies)."""
        if self.sync.cuda:
            torch.cuda.synchronize(self.device)
        if self.disk is not None:
            self.disk.close()
        self.source.close()
        if self.pins is not None:
            self.pins.release()
