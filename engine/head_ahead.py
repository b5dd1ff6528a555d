"""When a pass copies a streamed lm_head ahead (streamer.lent), and where the copies wait.

A pass that feeds at least a prefill chunk of prompt tokens is bound by its compute, and its copies are
done long before its last layer; only the lm_head's chunks past the staging slots then wait, one slot at a
time, after the last layer (streamer.lent says how long). Such a pass lends the streamer pieces for them:

* first the KV rows of a slot cache that no running sequence holds and the pass does not run (a burst's 16
  sequences leave 16 of 32 rows free: 2.1 GB on the 7B at 6 GiB); nothing reads or writes them before a
  sequence is admitted there, after the pass (engine.serving.runner names them);
* else the memory the pass may spare (``room``): with its states in VRAM, the planned states' room it leaves
  (the plan sizes ``prefill_state_bytes`` for ``batch`` x ``max_context`` tokens, a pass of R rows keeps R
  rows of hidden and residual), within what the allocator's cap leaves beside the live tensors and the
  workspace; with its states in host memory, that cap's room alone (GPU only).

Not with captured prompt graphs (their pool takes the room), nor when a pass runs again after running out of
memory (engine.serving.retry). The spare room serves a layer's weights widened once for all of a pass's units
(engine.dense_layer) first, where that is on and the pass has several units; the lm_head then gets what is left.

On by default (``LAYERSTREAM_HEAD_AHEAD=0`` turns it off): on an H100 (session 49, call2: the synthetic 7B AWQ at
6 GiB, the 16-prompt burst in one process, arms alternated) the first pass took 214.6-216.7 ms against 227.4-274.2 ms
without, the second 396.9-409.8 against 403.8-464.9 ms, tokens and logits equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine import dense_layer
from engine.dense_layer import Carve  # (bytes, row bytes) -> pieces of whole rows, or None
from engine.switches import switch_on

ALIGN = 16  # bytes: where a carved piece may start (the GEMMs' tensor descriptors want 16-byte aligned rows)
GRANULE = 16  # rows: a piece of a request cut in several is a multiple of it (the GEMMs' tiles)
MAX_PIECES = 64  # a request needing more pieces than this is not carved (None)
MARGIN = 64 << 20  # bytes left unlent beside the pass's own peak (as the plan's allocator allowance)


def wanted() -> bool:
    """Whether compute-bound prompt passes copy the lm_head ahead (unless ``LAYERSTREAM_HEAD_AHEAD=0``)."""
    return switch_on("LAYERSTREAM_HEAD_AHEAD")


def split(model, rows: int, units: int, host_states: bool, graphs: bool,
          free_spans: Callable[[], list[torch.Tensor]] | None = None
          ) -> tuple[Callable[[], Carve] | None, Carve | None]:
    """(a fresh carver for each layer's weights widened once, engine.dense_layer; the carver of the lm_head's lent
    chunks), either None when off, in a pass over ``rows`` token rows in ``units`` units. ``free_spans()``: flat
    views of KV memory no sequence holds (a slot cache's free rows, engine.state_parking.free_row_spans; made only
    for a pass that lends, not for every decode step): the head's chunks are carved there first and every layer's
    widened weights after them; without, new allocations from what the pass may spare (``room``), a layer's
    first."""
    plan = model.weights.plan
    dense_on = dense_layer.wanted() and units > 1
    head_on = wanted() and not plan.lm_head_resident
    if not (dense_on or head_on) or not model.lend_head or graphs or rows < plan.prefill_chunk:
        return None, None
    if free_spans is not None and (found := free_spans()):
        spans = SpanCarver(found)
        return (spans.fork if dense_on else None), (spans if head_on else None)
    spare = room(model, rows, host_states, graphs)
    need = dense_layer.layer_bytes(model.cfg, model.dtype.itemsize)
    layer = (lambda: alloc_carver(need, model.device)) if dense_on and need <= spare else None
    left = spare - (need if layer is not None else 0)
    return layer, (alloc_carver(left, model.device) if head_on and left > 0 else None)


class SpanCarver:
    """Pieces of whole rows carved in order from flat spans (viewed as bytes, the largest first), each starting
    ``ALIGN``-aligned; a call returns None once a request does not fit. A request that no span holds whole is cut
    into the fewest equal pieces that fit, each a multiple of ``GRANULE`` rows (the last one shorter), else (spans
    too small for those) into as many rows as each span holds. A burst's free rows are 56 spans of 5,266 of the
    7B's rows; pieces cut at each span's end (session 49, call1) gave GEMMs odd widths, each tuned while serving
    and most unaligned for TMA stores. ``fork``: a carver of what is left now (each layer's own)."""

    def __init__(self, spans: list[torch.Tensor], at: tuple[int, int] = (0, 0), ordered: bool = False) -> None:
        self.spans = spans if ordered else [s.view(torch.uint8) for s in sorted(spans, key=lambda s: -s.numel())]
        self.at = at  # the span, the offset in it

    def fork(self) -> SpanCarver:
        return SpanCarver(self.spans, self.at, ordered=True)

    def __call__(self, nbytes: int, row_bytes: int) -> list[torch.Tensor] | None:
        assert nbytes % row_bytes == 0, (nbytes, row_bytes)
        rows, last = nbytes // row_bytes, None
        for k in range(1, MAX_PIECES + 1):
            per = min(rows, _ceil(_ceil(rows, k), GRANULE) * GRANULE)  # rows / k, up to whole granules
            if per == last:
                continue
            last, placed = per, self._place(rows, per, row_bytes)
            if placed is not None:
                break
        else:
            placed = self._place(rows, None, row_bytes)
        if placed is None:
            return None
        pieces, self.at = placed
        return pieces

    def _place(self, rows: int, per: int | None, row_bytes: int) -> tuple[list[torch.Tensor], tuple[int, int]] | None:
        """Pieces of ``per`` rows (the last what is left; None: as many as each span holds) from the cursor on, each
        whole in one span, and where the cursor ends; None when they run past the last span."""
        pieces, left, (i, off) = [], rows, self.at
        while left:
            if i >= len(self.spans):
                return None
            span, off = self.spans[i], _ceil(off, ALIGN) * ALIGN  # each piece starts 16-byte aligned (TMA)
            fits = max(0, span.numel() - off) // row_bytes
            take = min(left, per if per is not None else fits)
            if take > fits or not take:
                i, off = i + 1, 0
                continue
            pieces.append(span[off:off + take * row_bytes])
            left, off = left - take, off + take * row_bytes
        return pieces, (i, off)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def alloc_carver(room: int, device: torch.device) -> Carve:
    """One new allocation a chunk while ``room`` bytes last (None after, or when the allocator has no room)."""
    left = [room]

    def carve(nbytes: int, row_bytes: int) -> list[torch.Tensor] | None:
        if nbytes > left[0]:
            return None
        try:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            left[0] = 0
            return None
        left[0] -= nbytes
        return [buf]
    return carve


def room(model, rows: int, host_states: bool, graphs: bool) -> int:
    """Bytes a pass over ``rows`` token rows may spare for a pass's own buffers (0: none). Its states in VRAM: the
    planned states' room it leaves (within the cap's). In host memory (parked in the KV cache's unreached
    positions, or crossing PCIe: the plan's states room then holds the chunks in flight): what the allocator's cap
    leaves beside the live tensors and the whole workspace, on a GPU only (a pass that then runs out of memory runs
    again without, engine.serving.retry)."""
    plan = model.weights.plan
    if not model.lend_head or graphs or rows < plan.prefill_chunk:
        return 0
    states = 0 if host_states else rows * 2 * model.cfg.hidden_size * model.dtype.itemsize
    if model.device.type != "cuda":
        return 0 if host_states else max(0, plan.prefill_state_bytes - states - MARGIN)
    workspace = plan.workspace_bytes - (0 if host_states else plan.prefill_state_bytes - states)
    free = plan.allocator_bytes - torch.cuda.memory_allocated(model.device) - workspace
    lend = free if host_states else min(free, plan.prefill_state_bytes - states)
    return max(0, lend - MARGIN)
