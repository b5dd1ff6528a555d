"""Timing for the kernels' first-call tuning, inside the engine's VRAM budget.

``triton.testing.do_bench`` allocates a 256 MB buffer to flush the L2 between runs. Tuning
happens on the first call of each shape, while the engine runs under a VRAM budget, so that
buffer could push the peak past the budget. Most tuned operands are far larger than the L2
(MLP and lm_head weights, long KV caches) and are timed back to back; operands that could
stay in the L2 between calls (a 7B model's attention projections, 26-33 MB against the H100's
50 MB; a 4k-token KV cache) are timed ``cold``: each call after a read of an L2-sized buffer.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from kernels.graph_capture import capture

_UNTUNED = contextvars.ContextVar("kernels_untuned", default=False)


@contextlib.contextmanager
def untuned() -> Iterator[None]:
    """Inside: a shape with no tuned config yet runs its default config, neither timed nor kept.

    For one-off calls whose tuning costs far more than it can save. A short prompt's prefill
    (<= 64 rows) runs the weight-streaming GEMV at a row bucket that decode may never use;
    tuning it compiles ~36 configs first: its first call took 18.7 s on the H100 with a cold
    Triton cache (configs compiled one after another; bench/probe_compile.py), 0.26 s untuned,
    to save well under a millisecond once. A later call outside this context tunes as usual.
    """
    token = _UNTUNED.set(True)
    try:
        yield
    finally:
        _UNTUNED.reset(token)


_LIKE_ROWS = contextvars.ContextVar("kernels_like_rows", default=None)


@contextlib.contextmanager
def picks_like(rows: int) -> Iterator[None]:
    """Inside (and inside :func:`untuned`): a weight-streaming GEMV of a shape with no pick of its own runs the pick
    of the same call with ``rows`` output rows, so pieces of a weight cut wherever memory was free run the launch
    config (and the compiled kernel) of the whole they come from (engine.head_ahead's lent lm_head pieces:
    session 49 call2, the default config built while serving the first burst pass, 355 against 210 ms)."""
    token = _LIKE_ROWS.set(rows)
    try:
        yield
    finally:
        _LIKE_ROWS.reset(token)


def like_rows() -> int | None:
    """The rows set by :func:`picks_like`, or None."""
    return _LIKE_ROWS.get()


def tuning_suspended() -> bool:
    """Whether the caller is inside :func:`untuned`."""
    return _UNTUNED.get()


def bench_ms(fn, warmup: int = 5, rep: int = 25, quantiles=None):
    """Median (or the given quantiles) of ``rep`` timed calls of ``fn``, in ms, via CUDA events."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)])
    if quantiles is not None:
        return torch.quantile(times, torch.tensor(list(quantiles))).tolist()
    return float(times.median())


@functools.cache
def l2_bytes(index: int) -> int:
    """L2 cache size of a CUDA device in bytes."""
    return torch.cuda.get_device_properties(index).L2_cache_size


def fits_l2(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` of operands could stay in the device's L2 across back-to-back calls."""
    return device.type == "cuda" and nbytes < 2 * l2_bytes(device.index or 0)


def _capture(body, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``calls`` body() calls, captured on a side stream."""
    graph = torch.cuda.CUDAGraph()
    with capture(graph, torch.cuda.Stream()):
        for _ in range(calls):
            body()
    return graph


def graph_ms(fn, calls: int = 10, cold: bool = False) -> float:
    """GPU ms of one fn() replayed from a CUDA graph of `calls` calls (no host launch overhead).

    cold: each call follows a read of an L2-sized buffer, so operands that fit the L2 come from
    HBM as in a decode step, which reads every weight and KV block once (on the H100, timed hot,
    the batch-8 qkv GEMV tuning picked a config 8% slower on rotating weights than the cold
    timing's pick). The flush's own time is taken off pairwise: replays of the flushed graph and
    of a flush-only graph alternate and the median difference counts. The buffer (L2 size, fp32)
    lives only during the call: it fits the planner's allocator allowance (64 MiB) above the
    decode activations.

    Each capture gets a private memory pool that the caching allocator keeps reserved after
    the graph is gone, until ``empty_cache``; a tuner captures graphs per candidate, so without
    releasing them the process's reserved memory grew past the VRAM budget (0.7 GiB over it
    after a memreport run on the H100). Pools and buffer are released before returning."""
    fn()  # compile (and hit any resource error) outside the capture
    graphs: list[torch.cuda.CUDAGraph] = []
    bufs: list[torch.Tensor] = []
    try:
        if not cold:
            graphs.append(_capture(fn, calls))
            return bench_ms(graphs[0].replay, warmup=2, rep=7) / calls
        calls = max(calls, 20)  # the difference of two longer replays: less noise
        torch.cuda.empty_cache()  # the buffer gets a segment of its own, not one on top of cached blocks
        bufs.append(torch.empty(l2_bytes(torch.cuda.current_device()) // 4, device="cuda", dtype=torch.float32))

        def flushed() -> None:
            bufs[0].sum()  # reads every line of the buffer; writes one scalar
            fn()

        graphs += [_capture(flushed, calls), _capture(bufs[0].sum, calls)]
        diffs = [bench_ms(graphs[0].replay, warmup=1, rep=1) - bench_ms(graphs[1].replay, warmup=1, rep=1)
                 for _ in range(9)]
        return max(sorted(diffs)[len(diffs) // 2], 0.0) / calls
    finally:
        graphs.clear()
        bufs.clear()
        torch.cuda.empty_cache()  # frees the dead graphs' pools and the buffer (never during a capture)


def precompile(cands: Sequence, run: Callable, device: torch.device, workers: int = 16) -> None:
    """Run every candidate once from a pool of threads, so that their Triton compiles overlap.

    Triton releases the GIL while it compiles: on the H100 machine's 16 cores the prefill GEMM's
    16 configs compiled in 1.5 s from 16 threads against 9.2 s one after another
    (bench/probe_compile.py). The launches go to the caller's current stream, and the device is
    synchronised before returning, so the timing that follows starts from an idle GPU and finds
    every config compiled. A candidate that fails here (e.g. out of shared memory) is left for
    the timing loop to meet and skip. CUDA only, outside graph captures; otherwise a no-op."""
    if len(cands) < 2 or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    stream = torch.cuda.current_stream(device)

    def one(cfg) -> None:
        try:
            with torch.cuda.stream(stream):
                run(cfg)
        except Exception:  # noqa: BLE001 - the timing loop skips it
            pass

    with ThreadPoolExecutor(max_workers=min(workers, os.cpu_count() or 1, len(cands))) as pool:
        list(pool.map(one, cands))
    torch.cuda.synchronize(device)


class NoCandidate(RuntimeError):
    """Raised by :func:`fastest` when no candidate config could run."""


_FINALISTS = 4  # candidates re-timed after the first pass ...
_CLOSE = 1.15  # ... if within this factor of the first pass's best
_RETIMES = 2  # further timings of each finalist, round robin; the lowest median wins


def fastest(cands: list, run, timer, accept=None, name: str = "kernel", device: torch.device | None = None,
            skip: tuple[type[BaseException], ...] = (Exception,)):
    """The candidate config whose ``run(cfg)`` ``timer`` measures fastest.

    A candidate that fails with one of ``skip`` (e.g. out of shared memory) is skipped, and so
    is one that ``accept(cfg)``, called right after its timing, rejects. A single candidate is
    returned untimed; none left raises :class:`NoCandidate` (a RuntimeError). With a CUDA
    ``device`` the candidates are compiled in parallel first (:func:`precompile`).

    One timing per candidate picks wrongly when candidates are close: the batch-8 qkv GEMV on
    the H100 kept a config ~9% slower than the best in two of four runs. So the up to
    _FINALISTS fastest within _CLOSE of the best are timed _RETIMES more times, in turn (drift
    hits them alike), and the lowest median of each one's timings wins.
    """
    if len(cands) == 1:
        return cands[0]
    if device is not None:
        precompile(cands, run, device)
    times: dict[int, list[float]] = {}
    for i, cfg in enumerate(cands):
        try:
            ms = timer(lambda c=cfg: run(c))
        except skip:  # a config this GPU cannot run
            continue
        if accept is None or accept(cfg):
            times[i] = [ms]
    if not times:
        raise NoCandidate(f"{name}: no candidate config could be compiled")
    ranked = sorted(times, key=lambda i: times[i][0])
    finalists = [i for i in ranked[:_FINALISTS] if times[i][0] <= times[ranked[0]][0] * _CLOSE]
    for _ in range(_RETIMES if len(finalists) > 1 else 0):
        for i in finalists:
            times[i].append(timer(lambda c=cands[i]: run(c)))
    return cands[min(finalists, key=lambda i: statistics.median(times[i]))]
