"""The server's hand-over of outputs from the engine thread to the event loop (engine/serving/delivery.py) and
its GIL switch interval (engine/serve.py)."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from engine.serving.delivery import LoopDelivery


class _Counting:
    """An event loop's call_soon_threadsafe, counted."""

    def __init__(self, aio: asyncio.AbstractEventLoop) -> None:
        self.aio, self.calls = aio, 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1
        return self.aio.call_soon_threadsafe(fn, *args)


def test_a_steps_outputs_wake_the_loop_once_and_keep_their_order():
    """16 streams' outputs of 50 steps from another thread: each queue gets its own outputs in order, and a
    step's 16 outputs (put while the loop is held up) cost one wake-up, not 16."""
    async def run() -> tuple[list[list[tuple[int, int]]], int]:
        aio = asyncio.get_running_loop()
        counting = _Counting(aio)
        delivery = LoopDelivery(counting)  # type: ignore[arg-type]
        queues = [asyncio.Queue() for _ in range(16)]
        sinks = [delivery.sink(q) for q in queues]
        released = [threading.Event() for _ in range(50)]

        def engine() -> None:  # a step: every stream's output, then wait for the loop to take them
            for step in range(50):
                for i, sink in enumerate(sinks):
                    sink((i, step))
                released[step].wait(5)

        worker = threading.Thread(target=engine)
        worker.start()
        got: list[list[tuple[int, int]]] = [[] for _ in queues]
        for step in range(50):
            for i, q in enumerate(queues):
                got[i].append(await asyncio.wait_for(q.get(), 5))
            released[step].set()
        worker.join(5)
        return got, counting.calls

    got, calls = asyncio.run(run())
    assert got == [[(i, step) for step in range(50)] for i in range(16)]
    assert 50 <= calls < 16 * 50 / 4  # about one a step (a step's first output may land while the loop delivers)


def test_the_server_gil_switch_interval(monkeypatch):
    from engine.serve import gil_switch_s
    monkeypatch.delenv("LAYERSTREAM_GIL_SWITCH_MS", raising=False)
    assert gil_switch_s() == pytest.approx(0.001)
    monkeypatch.setenv("LAYERSTREAM_GIL_SWITCH_MS", "0.25")
    assert gil_switch_s() == pytest.approx(0.00025)
    for bad in ("0", "-1", "fast", "1000"):
        monkeypatch.setenv("LAYERSTREAM_GIL_SWITCH_MS", bad)
        with pytest.raises(ValueError, match="LAYERSTREAM_GIL_SWITCH_MS"):
            gil_switch_s()


def test_a_bad_switch_interval_stops_the_server_before_loading(monkeypatch, capsys):
    from engine.run import main
    monkeypatch.setenv("LAYERSTREAM_GIL_SWITCH_MS", "soon")
    before = sys.getswitchinterval()
    assert main(["serve", "--model", "/nonexistent/model-dir"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "LAYERSTREAM_GIL_SWITCH_MS" in err and "Traceback" not in err
    assert sys.getswitchinterval() == before
