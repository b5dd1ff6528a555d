"""Page-locking host buffers in place (cudaHostRegister) instead of allocating pinned memory.

The streamed layers live in host buffers that the copy engine reads with async copies, so they
must be page-locked. Allocating them with ``torch.empty(pin_memory=True)`` went through the
driver's pinned allocator at 1.4 GB/s on the H100 machine (9.8 GB of 7B layers: 6.9 s serial,
5.0 s from 8 threads), the largest part of a warm engine start. Allocating plain memory,
filling it from the packing threads (the first touch happens there, in parallel) and then
registering it took 1.1-1.2 s for the same bytes, and copies out of it run at the same
host-to-device rate (bench/probe_pinned.py, bench/results/2026-11-22-h100-run11). Registered
buffers are also exactly as large as asked, where the pinned allocator rounds up.

A registered buffer must be unregistered before its memory is freed: :class:`PinnedSet` keeps
the buffers it registered alive until :meth:`PinnedSet.release` (or until the set itself is
garbage collected, through a finalizer that owns the references).
"""

from __future__ import annotations

import logging
import threading
import weakref

import torch

log = logging.getLogger(__name__)

# cudaHostRegisterPortable: page-locked for every CUDA context, not only the calling thread's
# current device's (the packing threads never select the engine's device)
_PORTABLE = 1


def _unregister(bufs: list[torch.Tensor]) -> None:
    rt = torch.cuda.cudart()
    for b in bufs:
        rt.cudaHostUnregister(b.data_ptr())  # an error code at interpreter exit is harmless
    bufs.clear()


class PinnedSet:
    """Host tensors page-locked in place; :meth:`release` unlocks them all (idempotent).

    The caller must make sure no copy out of a buffer is still in flight when releasing.
    """

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._warned = False
        self._finalizer = weakref.finalize(self, _unregister, self._bufs)

    def pin(self, buf: torch.Tensor) -> torch.Tensor:
        """Page-lock ``buf`` (a contiguous CPU tensor) and return it; if the driver refuses, return
        a copy in memory from torch's pinned allocator instead (slower to allocate, same use).

        Call it from a worker thread (as ``streamer.host.pack_all`` does): a refused registration
        leaves the CUDA runtime's per-thread last-error state set, and torch checks that state
        after its kernel launches on the thread."""
        assert buf.device.type == "cpu" and buf.is_contiguous(), "pin() takes a contiguous host tensor"
        if buf.numel() == 0:
            return buf
        nbytes = buf.numel() * buf.element_size()
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, _PORTABLE)
        if int(err) != 0:
            if not self._warned:
                self._warned = True
                log.warning("cudaHostRegister failed (%s): falling back to torch's pinned allocator, "
                            "which loads more slowly", err)
            return torch.empty_like(buf, pin_memory=True).copy_(buf)
        with self._lock:
            self._bufs.append(buf)
        return buf

    def __len__(self) -> int:
        return len(self._bufs)

    def release(self) -> None:
        """Unregister every buffer pinned here (they stay valid as ordinary host memory)."""
        with self._lock:
            _unregister(self._bufs)
