"""The idle engine's gather window (``EngineLoop._gather``) held open while a request is being admitted
(``EngineLoop.admitting``: its checks and tokenization before ``submit``), up to the window's cap; the engine
thread's loop itself is not started (its inbox is fed by hand)."""

from __future__ import annotations

import threading
import time

import pytest

from engine.serving.loop import EngineLoop

WINDOW = 0.05  # the cap is 4 windows


def _loop(window: float = WINDOW) -> tuple[EngineLoop, list]:
    loop = EngineLoop(lambda: None, gather_s=window)
    applied: list = []
    loop._apply = lambda cmd, arg: applied.append((cmd, arg)) or True  # noqa: SLF001  (no scheduler here)
    return loop, applied


def _arrive_later(loop: EngineLoop, delay: float, admitted: threading.Event | None = None) -> threading.Thread:
    """A request whose admission starts now and whose submit comes ``delay`` s later."""
    started = threading.Event()

    def run() -> None:
        with loop.admitting():
            started.set()
            time.sleep(delay)
            loop._inbox.put(("add", "late"))  # noqa: SLF001  (what submit queues)
        if admitted is not None:
            admitted.set()
    t = threading.Thread(target=run)
    t.start()
    assert started.wait(5)
    return t


def test_a_request_being_admitted_holds_the_window_open():
    """Its submit comes after the window (restarted by nothing) would have closed, but within the cap (a wider
    window than the others': on a loaded 2-core CI machine the admitting thread's sleep overran 4 x 50 ms)."""
    window = 0.25
    loop, applied = _loop(window)
    t = _arrive_later(loop, 1.6 * window)
    began = time.monotonic()
    assert loop._gather()  # noqa: SLF001
    t.join()
    assert applied == [("add", "late")]
    assert time.monotonic() - began < 4 * window + 0.5


def test_without_one_the_window_closes_on_time():
    loop, applied = _loop()
    began = time.monotonic()
    assert loop._gather()  # noqa: SLF001
    took = time.monotonic() - began
    assert applied == [] and WINDOW * 0.9 <= took < WINDOW + 0.5


def test_an_admission_that_never_ends_is_cut_at_the_cap():
    loop, applied = _loop()
    release = threading.Event()

    def stuck() -> None:
        with loop.admitting():
            release.wait(10)
    t = threading.Thread(target=stuck)
    t.start()
    time.sleep(0.01)
    began = time.monotonic()
    assert loop._gather()  # noqa: SLF001
    took = time.monotonic() - began
    release.set()
    t.join()
    assert applied == [] and 4 * WINDOW * 0.9 <= took < 4 * WINDOW + 0.5
    assert loop._admitting == 0  # noqa: SLF001


@pytest.mark.parametrize("fails", [False, True])
def test_admitting_counts_down_however_the_admission_ends(fails):
    loop, _ = _loop()
    with pytest.raises(ValueError) if fails else _nothing():
        with loop.admitting():
            assert loop._admitting == 1  # noqa: SLF001
            if fails:
                raise ValueError("a bad request")
    assert loop._admitting == 0  # noqa: SLF001


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
