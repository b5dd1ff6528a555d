"""Prompt states parked in the KV cache's unreached positions instead of host memory.

A plan that keeps the prompt states of a layer-major prefill in host memory (``HostStates``) does so
for the longest prompt its context allows. A shorter prompt leaves most of the contiguous KV cache
unreached during its pass: every layer's keys and values past the longest row's end. Those positions
are already allocated and nothing reads them before a later token writes them (attention reads only
positions below each sequence's length), so a pass whose states fit there parks them there: copies
between the compute buffers and the parked pieces run on the device at memory speed, and nothing
crosses PCIe but the weights. Measured as the reason to want this: on an H200 at 4 GiB, an 8k-token
prompt with its states in host memory took 1.55x one streamed pass (bench/results/2026-12-02-h200-s15).

:func:`kv_tail_spans` lists the free spans; :class:`Parking` carves a pass's buffers from them. A paged
cache (engine.serving.paged_cache) has no rows to run past, but its never-used blocks (free, holding no
cached prefix) are just as unread until a sequence is handed one and writes it: :func:`block_run_spans`
lists the runs of consecutive such blocks.
"""

from __future__ import annotations

import os

import torch

MIN_SPAN_ELEMENTS = 1 << 15  # spans shorter than this are not used (each piece is one more copy)


def parking_enabled() -> bool:
    """Whether host states that fit unreached KV positions are parked there (``LAYERSTREAM_PARK_STATES=0``: never)."""
    return os.environ.get("LAYERSTREAM_PARK_STATES", "1") == "1"


def kv_tail_spans(cache, ends: dict[int, int]) -> list[torch.Tensor]:
    """Flat views of the positions ``ends[row]`` .. ``max_context`` of every layer, head, keys and values
    of each row in ``ends`` (rows a pass does not name are left alone: other sequences' may be in use).

    ``cache`` is a contiguous ``engine.kv_cache.KVCache`` ([layers, rows, heads, positions, dim]): one
    head's tail is contiguous."""
    spans = []
    for t in (cache.k, cache.v):
        positions, dim = t.shape[3:]
        for row, end in sorted(ends.items()):
            if (positions - end) * dim < MIN_SPAN_ELEMENTS:
                continue
            per_layer = t[:, row, :, end:].flatten(-2).unbind(0)  # [heads, tail] each: one head's tail is flat
            spans += [head for layer in per_layer for head in layer.unbind(0)]
    return spans


def free_row_spans(cache, rows: list[int]) -> list[torch.Tensor]:
    """Flat views of every layer's keys and values of the cache ``rows`` no sequence holds (a slot cache's free
    slots), one per layer and run of consecutive rows: nothing reads or writes them until a sequence is admitted
    there (engine.head_ahead lends them to the streamer for one pass)."""
    runs = _consecutive(rows)
    return [t[i, a:b].view(-1) for t in (cache.k, cache.v) for i in range(t.shape[0]) for a, b in runs]


def _consecutive(ids) -> list[list[int]]:
    """``ids`` as runs ``[a, b)`` of consecutive integers, in order."""
    runs: list[list[int]] = []
    for x in sorted(ids):
        if runs and runs[-1][1] == x:
            runs[-1][1] = x + 1
        else:
            runs.append([x, x + 1])
    return runs


def block_run_spans(tensors: tuple[torch.Tensor, ...], blocks) -> list[torch.Tensor]:
    """Flat views of every layer's runs of consecutive ``blocks`` in each of ``tensors`` ([layers,
    blocks, ...] block pools: one run of one layer is contiguous); runs shorter than
    ``MIN_SPAN_ELEMENTS`` are left out."""
    runs, spans = _consecutive(blocks), []
    for t in tensors:
        per_block = t[0, 0].numel()
        for a, b in runs:
            if (b - a) * per_block >= MIN_SPAN_ELEMENTS:
                spans += [t[i, a:b].view(-1) for i in range(t.shape[0])]
    return spans


class Parking:
    """Buffers carved in order from flat spans of one dtype; each buffer is a list of pieces."""

    def __init__(self, spans: list[torch.Tensor]) -> None:
        self.spans = sorted(spans, key=lambda s: -s.numel())
        self.free = sum(s.numel() for s in spans)
        self.dtype = spans[0].dtype if spans else None
        self._span, self._offset = 0, 0

    def fits(self, sizes: list[int], dtype: torch.dtype) -> bool:
        """Whether buffers of these element counts, of ``dtype``, can be carved."""
        return self.dtype == dtype and sum(sizes) <= self.free

    def take(self, n: int) -> list[torch.Tensor]:
        """Pieces (flat views, in order) holding ``n`` elements."""
        assert n <= self.free, "parking over its free space (call fits first)"
        pieces = []
        while n > 0:
            span = self.spans[self._span]
            k = min(n, span.numel() - self._offset)
            pieces.append(span[self._offset:self._offset + k])
            n -= k
            self.free -= k
            self._offset += k
            if self._offset == span.numel():
                self._span, self._offset = self._span + 1, 0
        return pieces


def pairs(dst: list[torch.Tensor] | torch.Tensor, src: list[torch.Tensor] | torch.Tensor) -> list:
    """(dst, src) copy pairs between a whole tensor and a buffer's pieces, either way round."""
    if not isinstance(dst, list) and not isinstance(src, list):
        return [(dst, src)]
    whole, pieces, out = (src, dst, True) if isinstance(dst, list) else (dst, src, False)
    sizes = [p.numel() for p in pieces]
    assert sum(sizes) == whole.numel(), "a buffer's pieces cover its tensor exactly"
    parts = whole.view(-1).split(sizes)  # one call for every view (a pass makes ~500 of these lists)
    return list(zip(pieces, parts)) if out else list(zip(parts, pieces))
