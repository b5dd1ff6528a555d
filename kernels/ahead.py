"""Compile ahead: the Triton kernels a pass would launch, compiled in parallel and launched never.

A process's first pass over the model meets each kernel specialisation for the first time and
compiles them one after another (measured on an H200 with shipped tuning picks: 20.2 s for a first
short run against 10.7 s warm, the difference being compiles; bench/results/README.md). Inside
:func:`compile_only`, a Triton launch from the calling thread hands ``run(..., warmup=True)`` (compile
and load, no launch) to a pool of threads and returns None; Triton releases the GIL while it compiles,
so a dry pass over the model (run by the engine, see engine/ahead.py) turns the serial compiles into
parallel ones, and the real pass that follows finds every kernel compiled. The pool also builds each
kernel's launcher (kernels/launchers.py: Triton 3.6 compiles one in C at a kernel's first launch).

Inside, :func:`kernels.tuning.tuning_suspended` is true: a shape with a cached or shipped pick
compiles that pick, any other its default config; nothing is timed (nothing runs). Launches that
repeat a specialisation (every layer calls the same kernels) are compiled once: they are keyed the
way Triton specialises its arguments (tensors by dtype and 16-byte alignment, integers by == 1,
divisibility by 16 and 32/64-bit range, host tensor descriptors by dtype, alignment and block shape),
other keyword arguments by value. A key that merges two real
specialisations only leaves one of them to compile in the real pass; it never changes a result.
The compile gets small stand-ins for the tensors (same dtype, device and 16-byte alignment; a tensor
descriptor gets one as its base) and a plain grid, so a pending compile never keeps a pass's
activations alive past the budget. (Keyed by their repr, the TMA GEMM's descriptors once printed
their tensors' values: every launch was a new key holding its outputs until compiled, and a 16k-token
prompt went out of memory at 6 GB on the H200.)

Where the compiles run (``LAYERSTREAM_COMPILE_AHEAD``): with ``processes`` each new specialisation is
first warmed up in the calling thread under a ``jit_cache_hook`` that takes the compile's inputs and
skips the compile (the calling thread pays Triton's argument binding and the cache key: ~4 ms a kernel
on this repo's 2-core CPU machine), then compiled by a
pool of worker processes into Triton's on-disk cache (kernels/ahead_procs.py, kernels/ahead_pool.py;
Triton's front end holds the GIL, so threads overlap only its back end). A thread of the block then
loads it from disk into this process (as it does a kernel that was on disk already), so the real
pass compiles and loads nothing. ``threads`` compiles in the threads only, as does a kernel a worker
cannot rebuild, a failed worker compile (logged) and any compile when processes cannot start;
``0`` turns compile ahead off (checked by engine/ahead.py). The default (``1``) is ``threads``: on an
H200 a first short run took 25.8 s with processes against 26.4 s with threads (24.8 s with compile
ahead off; bench/results/2026-12-01-h200-s9/call1); on the CPU the processes are checked for sm_90
(tests/test_compile_ahead_procs.py).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import triton
from triton.runtime.jit import JITFunction

from kernels import ahead_pool, ahead_procs
from kernels.launchers import prebuild_launcher
from kernels.tuning import untuned

log = logging.getLogger(__name__)
_LOCK = threading.Lock()  # one compile_only at a time (it patches a class)


@dataclass
class AheadStats:
    """What a :func:`compile_only` block did: launches seen, compiles submitted (of which sent to worker
    processes, and found already in Triton's on-disk cache), launchers built, failures, workers' failures,
    seconds."""
    launches: int = 0
    compiles: int = 0
    in_processes: int = 0
    on_disk: int = 0
    launchers: int = 0  # launchers built in the pool (kernels/launchers.py)
    failures: list[str] = field(default_factory=list)
    worker_failures: list[str] = field(default_factory=list)  # then compiled in a thread instead
    seconds: float = 0.0


def mode() -> str:
    """``LAYERSTREAM_COMPILE_AHEAD`` as ``"threads"`` (default, ``1``), ``"processes"`` or ``"off"`` (``0``)."""
    value = os.environ.get("LAYERSTREAM_COMPILE_AHEAD", "threads").strip().lower()
    if value in ("0", "off"):
        return "off"
    if value in ("threads", "processes"):
        return value
    if value not in ("1", "on", ""):
        log.warning("LAYERSTREAM_COMPILE_AHEAD=%r is not one of 0, 1, threads, processes: using threads", value)
    return "threads"


class _Capture:
    """Triton's ``jit_cache_hook`` while a compile_only block sends compiles to processes: armed by the
    block's thread around one warm-up, it takes that compile's inputs as a job and skips the compile;
    any other compile goes to the hook that was there before."""

    def __init__(self, owner: int, previous) -> None:
        self.owner, self.previous = owner, previous
        self.armed = self.reached = False
        self.job = None
        self.envs = ahead_procs.env_vars()

    def __call__(self, **kw):
        if not self.armed or threading.get_ident() != self.owner:
            return self.previous(**kw) if self.previous is not None else None
        self.armed, self.reached = False, True
        try:
            self.job = ahead_procs.job_from_hook(kw["fn"].jit_function, kw["compile"], self.envs)
        except Exception as e:  # noqa: BLE001 - not shippable: the thread pool compiles it
            log.debug("compile ahead: no job for %s: %s", kw.get("repr"), e)
        return True

    def warm(self, original, fn: JITFunction, args: tuple, kwargs: dict, grid) -> str:
        """Run ``fn``'s warm-up with the hook armed: ``"job"`` (captured: ``self.job``, possibly None),
        ``"compiled"`` (this process has the kernel already) or ``"failed"`` (raised before the hook)."""
        self.armed, self.reached, self.job = True, False, None
        try:
            original(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - the thread pool meets it again and reports it
            log.debug("compile ahead: warm-up of %s raised %s", getattr(fn, "__name__", "kernel"), e)
            return "job" if self.reached else "failed"
        finally:
            self.armed = False
        return "job" if self.reached else "compiled"


def hook_knobs():
    """triton.knobs.runtime when this Triton has ``jit_cache_hook``, else None (then compile ahead runs in
    threads only, and the serve step log counts no builds)."""
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime if runtime is not None and hasattr(runtime, "jit_cache_hook") else None


def _desc_fields(v) -> tuple | None:
    """A host tensor descriptor's specialisation (triton.tools.tensor_descriptor: a dataclass holding its
    base tensor), or None for anything else."""
    base = getattr(v, "base", None)
    if not isinstance(base, torch.Tensor) or not hasattr(v, "block_shape"):
        return None
    return ("d", base.dtype, base.data_ptr() % 16 == 0, tuple(v.block_shape), len(v.shape),
            getattr(v, "padding", None), getattr(v, "round_f32_to_tf32", None))


def _arg_key(v) -> object:
    if isinstance(v, torch.Tensor):
        return ("t", v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int):
        return ("i", v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31))
    if isinstance(v, float):
        return "f"
    desc = _desc_fields(v)  # never its repr: that prints the base tensor's values (a device sync)
    return desc if desc is not None else repr(v)


def _standin(v):
    """A tensor argument as Triton's specialisation sees it (dtype, device, alignment), in a few bytes;
    a tensor descriptor gets such a base (it keeps its shape, strides and block shape)."""
    if _desc_fields(v) is not None:
        small = copy.copy(v)  # shape, strides, block shape and options kept; the base swapped
        small.base = _standin(v.base)
        return small
    if not isinstance(v, torch.Tensor):
        return v
    base = torch.empty(32, dtype=v.dtype, device=v.device)
    return base[(v.data_ptr() % 16) // v.element_size():]


def launch_key(fn: JITFunction, args: tuple, kwargs: dict) -> tuple:
    """The key a launch is deduplicated by (see the module docstring)."""
    kw = tuple(sorted((k, _arg_key(v) if isinstance(v, torch.Tensor) or _desc_fields(v) else repr(v))
                      for k, v in kwargs.items()))  # constexprs by value
    return id(fn), tuple(_arg_key(a) for a in args), kw


class _Threads:
    """The block's thread pool: warm-ups (compile, or load from the on-disk cache, into the kernel's
    in-process cache), possibly after a worker process's compile of the same kernel."""

    def __init__(self, workers: int | None, original, stats: AheadStats) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1),
                                       thread_name_prefix="compile")
        self.original, self.stats = original, stats
        self.futures: list[tuple[str, Future]] = []
        self.lock = threading.Lock()

    def warm(self, fn: JITFunction, args: tuple, kwargs: dict, grid, worker: Future | None = None) -> None:
        self.futures.append((getattr(fn, "__name__", "kernel"),
                             self.pool.submit(self._warm, fn, args, kwargs, grid, worker)))

    def _warm(self, fn, args, kwargs, grid, worker: Future | None):
        if worker is not None:
            try:
                worker.result()
            except Exception as e:  # noqa: BLE001 - compiled in this thread instead
                self.stats.worker_failures.append(f"{getattr(fn, '__name__', 'kernel')}: {e}"[:300])
        kernel = self.original(fn, *args, grid=grid, warmup=True, **kwargs)
        if prebuild_launcher(kernel):  # raises like a compile: recorded by wait()
            with self.lock:
                self.stats.launchers += 1
        return kernel

    def wait(self) -> None:
        """Wait for every warm-up; a failed one is recorded (the real launch meets it again)."""
        for name, fut in self.futures:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - the real launch meets it again
                self.stats.failures.append(f"{name}: {type(e).__name__}: {e}"[:300])
        self.pool.shutdown()


def _route(cap: _Capture | None, fn, args, kwargs, grid, stats: AheadStats, threads: _Threads) -> None:
    """One new specialisation: compiled by a worker process when ``cap`` captures it (then loaded here by
    a thread), loaded by a thread when it is on disk already, else compiled by a thread."""
    worker = None
    if cap is not None:
        how = cap.warm(threads.original, fn, args, kwargs, grid)
        if how == "compiled":
            return
        if how == "job" and cap.job is not None:
            if ahead_procs.in_disk_cache(cap.job):
                stats.on_disk += 1
            elif (worker := ahead_pool.submit(cap.job)) is not None:
                stats.in_processes += 1
    threads.warm(fn, args, kwargs, grid, worker)


@contextlib.contextmanager
def compile_only(workers: int | None = None, how: str | None = None) -> Iterator[AheadStats]:
    """Inside: this thread's Triton launches compile ahead and do not run (see module docstring);
    ``how`` is ``"processes"`` or ``"threads"`` (default: :func:`mode`), ``workers`` the threads' count.

    On exit every compile has finished and is loaded in this process (or failed: logged, and left for
    the real launch to meet)."""
    stats = AheadStats()
    owner = threading.get_ident()
    seen: set[tuple] = set()
    runtime = hook_knobs() if (how or mode()) == "processes" else None
    t0 = time.perf_counter()
    with _LOCK:
        original = JITFunction.run
        threads = _Threads(workers, original, stats)
        previous = runtime.jit_cache_hook if runtime is not None else None
        cap = _Capture(owner, previous) if runtime is not None else None

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
                # a warm-up ignores the grid; a grid callable can close over the launch's tensors, and a
                # queued compile would keep them (a prefill chunk's activations) alive past the pass
                _route(cap, self, args, kwargs, (1,), stats, threads)
            return None

        JITFunction.run = run
        if cap is not None:
            runtime.jit_cache_hook = cap
        try:
            with untuned():
                yield stats
        finally:
            JITFunction.run = original
            if cap is not None:
                runtime.jit_cache_hook = previous
            threads.wait()
            stats.seconds = time.perf_counter() - t0
    _report(stats)


def _report(stats: AheadStats) -> None:
    if stats.worker_failures:
        log.warning("compile ahead: %d worker compiles failed (compiled in threads instead): %s",
                    len(stats.worker_failures), "; ".join(stats.worker_failures[:3]))
    if stats.failures:
        log.info("compile ahead: %d of %d compiles failed (compiled at first launch instead): %s",
                 len(stats.failures), stats.compiles, "; ".join(stats.failures[:3]))
    log.info("compile ahead: %d launches, %d kernels (%d in worker processes, %d already on disk), %d launchers "
             "built, in %.2f s", stats.launches, stats.compiles, stats.in_processes, stats.on_disk, stats.launchers,
             stats.seconds)
