"""Tests for the tuners' shared timing (kernels/tuning.py) and ticket counters (kernels/tickets.py)."""
from __future__ import annotations

import torch

from kernels import tickets, tuning
from tests.kernel_utils import DEV, needs_cuda


def test_fits_l2_is_false_off_cuda() -> None:
    assert not tuning.fits_l2(1, torch.device("cpu"))


@needs_cuda
def test_fits_l2_against_the_device_cache() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    l2 = tuning.l2_bytes(dev.index)
    assert l2 > 0 and tuning.fits_l2(l2, dev) and not tuning.fits_l2(2 * l2, dev)


def test_counters_grow_and_keep_the_outgrown() -> None:
    """Counters grow by a fresh zeroed buffer; the outgrown one stays alive for captured graphs;
    each user gets buffers of its own."""
    dev = torch.device(DEV) if DEV != "cuda" else torch.device("cuda", torch.cuda.current_device())
    small = tickets.counters(dev, 4, "test")
    big = tickets.counters(dev, small.numel() + 1, "test")
    assert big.numel() > small.numel() and not bool(big.any()) and tickets._COUNTERS[(dev, "test")] is big
    assert any(t is small for t in tickets._OUTGROWN) and tickets.counters(dev, 4, "test") is big
    assert tickets.counters(dev, 4, "other") is not big


@needs_cuda
def test_cold_graph_timing_reads_from_hbm_and_releases_memory() -> None:
    """A sum over 16 MB (fits the L2 of an H100/H200) timed cold (after an L2-sized read) takes
    longer than timed hot, and no graph pool or flush buffer stays reserved afterwards."""
    x = torch.randn(4 << 20, device="cuda")
    out = torch.empty((), device="cuda")
    fn = lambda: torch.sum(x, dim=0, out=out)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()
    hot = tuning.graph_ms(fn, calls=20)
    cold = tuning.graph_ms(fn, calls=20, cold=True)
    assert 0.0 < hot < cold, (hot, cold)
    assert torch.cuda.memory_reserved() == reserved, (torch.cuda.memory_reserved(), reserved)


def test_precompile_runs_each_candidate_once_from_threads(monkeypatch) -> None:
    """Every candidate runs once, on worker threads, inside the caller's stream; a failing one is
    left to the timing loop; the device is synchronised before returning. Off CUDA: a no-op."""
    import contextlib
    import threading

    seen, synced = [], []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "caller-stream")
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext(seen.append(("stream", s))))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))

    def run(cfg):
        seen.append((cfg, threading.current_thread() is threading.main_thread()))
        if cfg == 2:
            raise RuntimeError("out of shared memory")

    dev = torch.device("cuda", 0)
    tuning.precompile([0, 1, 2, 3], run, dev)
    runs = sorted(x for x in seen if x[0] != "stream")
    assert runs == [(0, False), (1, False), (2, False), (3, False)]
    assert seen.count(("stream", "caller-stream")) == 4 and synced == [dev]
    seen.clear()
    tuning.precompile([0, 1], run, torch.device("cpu"))
    tuning.precompile([0], run, dev)
    assert seen == []


def _scripted_timer(times: dict[str, list[float]], log: list[str]):
    """A timer that runs fn (which records its config in log) and returns that config's next time."""
    def timer(fn) -> float:
        fn()
        return times[log[-1]].pop(0)
    return timer


def test_fastest_retimes_close_candidates_and_keeps_the_lowest_median() -> None:
    # b wins the first pass by luck; its next timings and a's say a is faster; c is far off
    times = {"a": [1.05, 1.00, 1.01], "b": [1.00, 1.20, 1.19], "c": [3.0]}
    log: list[str] = []
    assert tuning.fastest(list(times), log.append, _scripted_timer(times, log)) == "a"
    assert log == ["a", "b", "c", "b", "a", "b", "a"]  # c is not a finalist; round robin in rank order


def test_fastest_skips_failures_and_rejects_and_raises_when_none_is_left() -> None:
    def run(cfg: str) -> None:
        if cfg == "broken":
            raise ValueError("cannot compile")

    def timer(fn) -> float:
        fn()
        return 1.0

    assert tuning.fastest(["broken", "ok", "wrong"], run, timer, accept=lambda c: c != "wrong") == "ok"
    try:
        tuning.fastest(["broken", "wrong"], run, timer, accept=lambda c: c != "wrong")
    except tuning.NoCandidate as e:
        assert "no candidate" in str(e)
    else:
        raise AssertionError("fastest returned without a runnable candidate")


def test_fastest_skip_only_catches_the_given_errors() -> None:
    def run(cfg: str) -> None:
        raise KeyError(cfg)  # a bug, not a config the GPU cannot run

    try:
        tuning.fastest(["a", "b"], run, lambda fn: fn(), skip=(ValueError,))
    except KeyError:
        pass
    else:
        raise AssertionError("a bug in run() was swallowed")


def test_fastest_returns_a_single_candidate_untimed() -> None:
    def timer(fn) -> float:
        raise AssertionError("timed a single candidate")
    assert tuning.fastest(["only"], lambda c: None, timer) == "only"
