"""CUDA graph captures that cannot abort the process when they fail to begin.

In torch up to 2.12, ``CUDAGraph.capture_begin`` first records the default generator's state in
the graph, then registers the graph with that state, and the registration allocates two small
tensors when no other graph is registered. If that allocation fails (an allocator capped at the
VRAM budget, :mod:`memory.allocator_cap`), the graph holds a state it is not registered with,
and freeing the graph later aborts the whole process from C++ ("The graph should be registered
to the state"); Python never sees an exception it could catch. Seen on the H200 (torch 2.11) in
the GEMV tuning of a prefill's lm_head under a tight budget (tests/test_gpu_timeline.py).
torch 2.13 registers generators lazily and has no such state.

So a graph whose capture did not begin is never freed, not even when the interpreter shuts down
(a module-level list is cleared then, and the abort would come at exit): it gets one Python
reference that nothing ever drops. That costs a few hundred bytes of host memory and no device
memory (nothing was captured into its pool).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch

_NEVER_FREED: list[torch.cuda.CUDAGraph] = []  # the graphs kept (for counting and tests)


def never_free(graph: torch.cuda.CUDAGraph) -> None:
    """Keep ``graph``, whose capture failed to begin, alive for the rest of the process (a capture that
    began and then failed is freed as usual, with its memory pool)."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(graph))  # a reference no one holds: never freed
    _NEVER_FREED.append(graph)


def begin_capture(graph: torch.cuda.CUDAGraph, **kwargs) -> None:
    """``graph.capture_begin(**kwargs)``; if it raises, ``graph`` is kept alive and the error re-raised."""
    try:
        graph.capture_begin(**kwargs)
    except BaseException:
        never_free(graph)
        raise


def failed_graphs() -> int:
    """How many graphs failed to begin their capture in this process (kept, never freed)."""
    return len(_NEVER_FREED)


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, pool=None) -> Iterator[None]:
    """Capture the block's work on ``stream`` into ``graph`` (thread-local capture mode: other
    threads' CUDA calls do not invalidate it). ``stream`` first waits for the current stream, and
    the current stream waits for the capture's end."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        begin_capture(graph, pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
