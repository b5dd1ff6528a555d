"""Compile ahead: the Triton kernels a pass would launch, compiled in parallel and launched never.

A process's first pass over the model meets each kernel specialisation for the first time and
compiles them one after another (measured on an H200 with shipped tuning picks: 20.2 s for a first
short run against 10.7 s warm, the difference being compiles; bench/results/README.md). Inside
:func:`compile_only`, a Triton launch from the calling thread hands ``run(..., warmup=True)`` (compile
and load, no launch) to a pool of threads and returns None; Triton releases the GIL while it compiles,
so a dry pass over the model (run by the engine, see engine/ahead.py) turns the serial compiles into
parallel ones, and the real pass that follows finds every kernel compiled.

Inside, :func:`kernels.tuning.tuning_suspended` is true: a shape with a cached or shipped pick
compiles that pick, any other its default config; nothing is timed (nothing runs). Launches that
repeat a specialisation (every layer calls the same kernels) are compiled once: they are keyed the
way Triton specialises its arguments (tensors by dtype and 16-byte alignment, integers by == 1,
divisibility by 16 and 32/64-bit range), keyword arguments by value. A key that merges two real
specialisations only leaves one of them to compile in the real pass; it never changes a result.
The compile gets small stand-ins for the tensors (same dtype, device and 16-byte alignment), so a
pending compile never keeps a pass's activations alive past the budget.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from triton.runtime.jit import JITFunction

from kernels.tuning import untuned

log = logging.getLogger(__name__)
_LOCK = threading.Lock()  # one compile_only at a time (it patches a class)


@dataclass
class AheadStats:
    """What a :func:`compile_only` block did: launches seen, compiles submitted, failures, seconds."""
    launches: int = 0
    compiles: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _arg_key(v) -> object:
    if isinstance(v, torch.Tensor):
        return ("t", v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return ("i", v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31))
    if isinstance(v, float):
        return "f"
    return repr(v)


def _standin(v):
    """A tensor argument as Triton's specialisation sees it (dtype, device, alignment), in a few bytes."""
    if not isinstance(v, torch.Tensor):
        return v
    base = torch.empty(32, dtype=v.dtype, device=v.device)
    return base[(v.data_ptr() % 16) // v.element_size():]


def launch_key(fn: JITFunction, args: tuple, kwargs: dict) -> tuple:
    """The key a launch is deduplicated by (see the module docstring)."""
    kw = tuple(sorted((k, _arg_key(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in kwargs.items()))
    return id(fn), tuple(_arg_key(a) for a in args), kw


@contextlib.contextmanager
def compile_only(workers: int | None = None) -> Iterator[AheadStats]:
    """Inside: this thread's Triton launches compile in a pool and do not run (see module docstring).

    On exit every compile has finished (or failed: logged, and left for the real launch to meet)."""
    stats = AheadStats()
    owner = threading.get_ident()
    seen: set[tuple] = set()
    futures: list[tuple[str, Future]] = []
    pool = ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1), thread_name_prefix="compile")
    t0 = time.perf_counter()
    with _LOCK:
        original = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):
            if warmup or threading.get_ident() != owner:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            stats.launches += 1
            key = launch_key(self, args, kwargs)
            if key not in seen:
                seen.add(key)
                stats.compiles += 1
                args = tuple(_standin(a) for a in args)
                kwargs = {k: _standin(v) for k, v in kwargs.items()}
                futures.append((getattr(self, "__name__", "kernel"),
                                pool.submit(original, self, *args, grid=grid, warmup=True, **kwargs)))
            return None

        JITFunction.run = run
        try:
            with untuned():
                yield stats
        finally:
            JITFunction.run = original
            for name, fut in futures:
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001 - the real launch meets it again
                    stats.failures.append(f"{name}: {type(e).__name__}: {e}"[:300])
            pool.shutdown()
            stats.seconds = time.perf_counter() - t0
    if stats.failures:
        log.info("compile ahead: %d of %d compiles failed (compiled at first launch instead): %s",
                 len(stats.failures), stats.compiles, "; ".join(stats.failures[:3]))
    log.info("compile ahead: %d launches, %d kernels compiled in %.2f s", stats.launches, stats.compiles,
             stats.seconds)
