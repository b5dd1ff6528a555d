"""A step's outputs from the engine thread to the event loop, in one wake-up.

Each sequence's sink runs on the engine thread; calling ``call_soon_threadsafe`` per output wakes the loop
once per stream and step (16 streams: 16 wake-ups a step, each taking the GIL from the engine thread,
which issues the next layers' weight copies from Python). :class:`LoopDelivery` queues the outputs and
schedules one callback for all that arrive before the loop runs it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable


class LoopDelivery:
    """Puts outputs produced on any thread into asyncio queues of one event loop, in order per queue."""

    def __init__(self, aio: asyncio.AbstractEventLoop) -> None:
        self.aio = aio
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []

    def sink(self, queue: asyncio.Queue) -> Callable[[object], None]:
        """A sequence's sink: each output it gets goes to ``queue`` on the loop."""
        return functools.partial(self.put, queue)

    def put(self, queue: asyncio.Queue, out: object) -> None:
        """Queue ``out`` for ``queue`` (any thread); the first output since the last delivery schedules it."""
        with self._lock:
            self._pending.append((queue, out))
            first = len(self._pending) == 1
        if first:
            self.aio.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        for queue, out in batch:
            queue.put_nowait(out)
