"""Timing for the kernels' first-call tuning, inside the engine's VRAM budget.

``triton.testing.do_bench`` allocates a 256 MB buffer to flush the L2 between runs. Tuning
happens on the first call of each shape, while the engine runs under a VRAM budget, so
that buffer would push the peak past the budget, so timing here does not flush. Most tuned
operands are far larger than the L2 (MLP and lm_head weights, long KV caches); the attention
projections of a 7B model (26-33 MB) fit an H100's 50 MB L2, so their GEMV tuning ranks
configs on L2-resident data while a decode step reads them from HBM (a known inaccuracy).
"""

from __future__ import annotations

import torch


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


def graph_ms(fn, calls: int = 10) -> float:
    """GPU ms of one fn() replayed from a CUDA graph of `calls` calls (no host launch overhead).

    Each capture gets a private memory pool that the caching allocator keeps reserved after
    the graph is gone, until ``empty_cache``; a tuner captures one graph per candidate, so
    without releasing them the process's reserved memory grew past the VRAM budget (0.7 GiB
    over it after a memreport run on the H100). The pool is released before returning."""
    fn()  # compile (and hit any resource error) outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                for _ in range(calls):
                    fn()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)
        return bench_ms(graph.replay, warmup=2, rep=5) / calls
    finally:
        del graph
        torch.cuda.empty_cache()  # frees the dead graph's pool (never called during a capture)


def fastest(cands: list, run, timer, accept=None, name: str = "kernel"):
    """The candidate config whose ``run(cfg)`` ``timer`` measures fastest.

    A candidate that fails (e.g. out of shared memory) is skipped, and so is one that
    ``accept(cfg)``, called right after its timing, rejects. A single candidate is returned
    untimed; none left raises RuntimeError.
    """
    if len(cands) == 1:
        return cands[0]
    best, best_ms = None, float("inf")
    for cfg in cands:
        try:
            ms = timer(lambda: run(cfg))
        except Exception:  # noqa: BLE001 - a config this GPU cannot run: skip it
            continue
        if accept is not None and not accept(cfg):
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"{name}: no candidate config could be compiled")
    return best
