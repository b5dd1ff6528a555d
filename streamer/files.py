"""Reading byte spans of files into flat buffers (``pread``, several threads, optional cache drop).

Spans are split into 16 MiB requests spread over a pool of threads (one per core, at least four):
at load, the page cache is read into host memory at several times one thread's copy rate, and an
NVMe drive serving the disk tier sees a deep queue. The disk tier re-reads its units every step
and drops the bytes from the page cache afterwards, since the host budget put those units on
disk because RAM is short; units packed once at load keep the cache. Nothing here writes to the
files.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from streamer.units import Span, UnitSpec

CHUNK = 16 << 20


class SpanReader:
    """Fills unit buffers from their spans (or their packers); safe to call from several threads."""

    def __init__(self, threads: int | None = None) -> None:
        threads = threads or max(4, os.cpu_count() or 1)
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="span-read")

    def fill(self, unit: UnitSpec, buf: torch.Tensor, *, parallel: bool = False, drop_cache: bool = False) -> None:
        """Write ``unit``'s packed bytes into ``buf`` (a flat uint8 CPU tensor of >= unit.nbytes)."""
        if unit.pack is not None:
            unit.pack(buf)
            return
        assert buf.dtype == torch.uint8 and buf.is_contiguous() and buf.numel() >= unit.nbytes
        view = memoryview(buf.numpy())
        jobs = [(s, pos) for s in unit.spans for pos in range(0, s.nbytes, CHUNK)]
        if parallel and len(jobs) > 1:
            for f in [self._pool.submit(self._read, s, pos, view, drop_cache) for s, pos in jobs]:
                f.result()
        else:
            for s, pos in jobs:
                self._read(s, pos, view, drop_cache)

    def _read(self, s: Span, pos: int, view: memoryview, drop_cache: bool) -> None:
        n = min(CHUNK, s.nbytes - pos)
        fd = self._fd(s.file)
        if os.preadv(fd, [view[s.dest + pos:s.dest + pos + n]], s.offset + pos) != n:
            raise ValueError(f"{s.file} is truncated: a read of {n} bytes at {s.offset + pos} came back short; "
                             "re-download the file")
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, s.offset + pos, n, os.POSIX_FADV_DONTNEED)

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        """Stop the reading threads and close the files."""
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
