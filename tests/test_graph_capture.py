"""A CUDA graph whose capture fails to begin is never freed (kernels.graph_capture).

Freeing such a graph aborts the process in torch <= 2.12 (see the module's docstring), so the
tuner's capture and the engine's decode-graph capture must keep it. Fakes stand in for the CUDA
graph and streams here; tests/test_gpu_graph_capture.py makes a real registration fail.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from engine.graphs import DecodeGraph
from kernels import graph_capture, tuning


class FakeGraph:
    def __init__(self, fail_begin: bool = False) -> None:
        self.fail_begin, self.calls = fail_begin, []

    def capture_begin(self, **kwargs) -> None:
        self.calls.append(("begin", kwargs))
        if self.fail_begin:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")

    def capture_end(self) -> None:
        self.calls.append(("end", {}))


class FakeStream:
    def wait_stream(self, other) -> None:
        pass


@pytest.fixture
def fake_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    before = len(graph_capture._NEVER_FREED)
    yield
    del graph_capture._NEVER_FREED[before:]


def _freed(make) -> bool:
    """Whether the graph that make() creates (and drops, raising) is gone after a collection."""
    ref = []
    with pytest.raises((torch.OutOfMemoryError, RuntimeError)):
        make(ref)
    gc.collect()
    return ref[0]() is None


def test_a_graph_whose_capture_did_not_begin_is_kept(fake_streams):
    def make(ref):
        g = FakeGraph(fail_begin=True)
        ref.append(weakref.ref(g))
        with graph_capture.capture(g, FakeStream()):
            raise AssertionError("the block must not run")
    n = graph_capture.failed_graphs()
    assert not _freed(make)
    assert graph_capture.failed_graphs() == n + 1


def test_a_capture_that_began_is_ended_and_freed_normally(fake_streams):
    graphs = []

    def make(ref):
        g = FakeGraph()
        graphs.append(g.calls)
        ref.append(weakref.ref(g))
        with graph_capture.capture(g, FakeStream(), pool=(0, 7)):
            raise RuntimeError("a kernel failed inside the capture")
    n = graph_capture.failed_graphs()
    assert _freed(make)
    assert graph_capture.failed_graphs() == n
    assert graphs[0] == [("begin", {"pool": (0, 7), "capture_error_mode": "thread_local"}), ("end", {})]


def test_the_tuners_capture_keeps_a_graph_that_did_not_begin(fake_streams, monkeypatch):
    made = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: made.append(FakeGraph(fail_begin=True)) or made[-1])
    with pytest.raises(torch.OutOfMemoryError):
        tuning._capture(lambda: None, 3)
    ref = weakref.ref(made.pop())
    gc.collect()
    assert ref() is not None
    body = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: FakeGraph())
    g = tuning._capture(lambda: body.append(1), 3)
    assert body == [1, 1, 1] and [c[0] for c in g.calls] == ["begin", "end"]


def test_the_decode_graphs_capture_frees_a_graph_that_began(monkeypatch):
    """A capture that began and then failed (a kernel error, out of memory inside it) frees its graph and
    so its memory pool: the engine then decodes eagerly and needs that memory back."""
    before = len(graph_capture._NEVER_FREED)
    made = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: made.append(FakeGraph()) or made[-1])
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: contextlib.nullcontext())

    def failing() -> None:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing (fake)")
    with pytest.raises(RuntimeError):
        DecodeGraph._graph(SimpleNamespace(pool=None), [failing])
    ref = weakref.ref(made.pop())
    gc.collect()
    assert ref() is None and len(graph_capture._NEVER_FREED) == before


def test_the_decode_graphs_capture_keeps_a_graph_that_failed(monkeypatch):
    before = len(graph_capture._NEVER_FREED)
    made = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: made.append(FakeGraph()) or made[-1])

    class Failing:
        def __init__(self, g, **kwargs) -> None:
            g.capture_begin(**kwargs)

        def __enter__(self):
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")

        def __exit__(self, *exc) -> None:
            pass
    monkeypatch.setattr(torch.cuda, "graph", Failing)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            DecodeGraph._graph(SimpleNamespace(pool=None), [lambda: None])
        ref = weakref.ref(made.pop())
        gc.collect()
        assert ref() is not None
    finally:
        del graph_capture._NEVER_FREED[before:]
