"""Units copied ahead into buffers a caller lends for one pass, outside the staging ring.

A compute-bound pass (a burst of prompts) leaves the copy engine idle most of the time, yet the ring runs at
most ``num_slots`` units ahead of the compute. The lm_head streams after the last layer in chunks of a slot
each, so after the last layer each chunk's copy waits for the slot the chunk before it frees: the head waits
on (chunks - slots) copies in a row (an H100's traced burst pass: 15.0 ms of its 250.6 ms waiting before the
head's GEMVs, bench/results/2026-12-06-h100-s47/call4). A caller with memory to spare for one pass lends
buffers for some units (``WeightStreamer.lend``): their copies go out early, one behind each ring copy, where
the copy engine has time, and the ring skips them (its slots and events move on as if they had been copied).

Order: a copy into a lent buffer waits for the compute stream's work queued before the buffer was lent (the memory may
have been another tensor's); a pass reading a lent unit waits for its copy; ``drop`` makes the compute
stream wait for every copy issued, so the buffers may be freed and reused at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from streamer.sync import Sync


@dataclass
class _Lent:
    """Unit j's bytes in lent pieces (flat uint8 views, in order, together its size); ``done`` is recorded on the
    copy stream after their copies."""

    pieces: list[torch.Tensor]
    done: object = None


class LentBuffers:
    """The units lent pieces this pass (unit index -> its pieces) and the copies not issued yet, in order."""

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.units: dict[int, _Lent] = {}
        self.pending: deque[int] = deque()
        self.lent_at = None  # an event on the compute stream at the latest lending: the copies wait for it
        self.copies = 0  # copies into lent buffers issued so far (tests and traces)

    def __contains__(self, j: int) -> bool:
        return j in self.units

    def __bool__(self) -> bool:
        return bool(self.units)

    def add(self, j: int, pieces: list[torch.Tensor]) -> None:
        assert j not in self.units, f"unit {j} has lent pieces already"
        self.units[j] = _Lent(pieces)
        self.pending.append(j)
        self.lent_at = self.sync.event()
        self.lent_at.record(self.sync.compute_stream())

    def issue(self, src: dict[int, torch.Tensor], count: int | None = None, upto: int | None = None) -> None:
        """Put ``count`` (None: all) pending copies on the copy stream, in order, or only up to unit ``upto``'s."""
        if not self.pending or count == 0:
            return
        with self.sync.on_copy_stream():
            self.sync.copy_stream.wait_event(self.lent_at)
            while self.pending and (count is None or count > 0):
                j = self.pending.popleft()
                h, a = self.units[j], 0
                for piece in h.pieces:
                    piece.copy_(src[j][a:a + piece.numel()], non_blocking=True)
                    a += piece.numel()
                h.done = self.sync.event()
                h.done.record(self.sync.copy_stream)
                self.copies += 1
                count = None if count is None else count - 1
                if j == upto:
                    break

    def wait(self, j: int, src: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Unit j's lent pieces, once the compute stream waits for their copies (issued now if still pending)."""
        h = self.units[j]
        if h.done is None:
            self.issue(src, upto=j)
        self.sync.compute_stream().wait_event(h.done)
        return h.pieces

    def drop(self) -> None:
        """Forget every lent buffer; the compute stream first waits for the copies issued into them."""
        stream = self.sync.compute_stream()
        for h in self.units.values():
            if h.done is not None:
                stream.wait_event(h.done)
        self.units.clear()
        self.pending.clear()
