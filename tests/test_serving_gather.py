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


def test_the_middleware_holds_the_window_from_a_requests_first_byte():
    """A completion request holds an idle engine's window open while its body is still on its way (the hold ends
    when it is answered); other paths hold nothing."""
    import asyncio

    from engine.serving.metrics import ServerMetrics
    from engine.serving.middleware import ADMISSION, AuthAndCount

    loop, _ = _loop()
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["path"], loop._admitting, scope[ADMISSION] is not None))  # noqa: SLF001
        if scope[ADMISSION] is not None:
            scope[ADMISSION]()  # what Api.complete does once its sequences are submitted
            scope[ADMISSION]()  # twice: nothing more
            seen.append(("released", loop._admitting, None))  # noqa: SLF001
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(_):
        pass
    mw = AuthAndCount(app, None, ServerMetrics(loop), hold=loop.hold_admission)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
        asyncio.run(mw({"type": "http", "path": path, "headers": []}, None, send))
    assert seen == [("/v1/completions", 1, True), ("released", 0, None), ("/v1/chat/completions", 1, True),
                    ("released", 0, None), ("/v1/models", 0, False)]
    assert loop._admitting == 0  # noqa: SLF001


def test_a_streamed_request_releases_its_hold_once_submitted(tiny_qwen2_dir):
    """Through the real app: while a streamed completion is still answering, no hold of its own is left (the
    next burst's gather window is not held open by a running request)."""
    pytest.importorskip("fastapi")
    from tests.helpers import make_engine
    from tests.serve_helpers import app_server, open_stream

    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=256)).start()
    assert loop.ready.wait(60) and loop.error is None
    with app_server(loop) as url:
        with open_stream(url + "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 40, "stream": True,
                                                    "temperature": 0, "ignore_eos": True}) as r:
            first = r.readline()
            assert first.startswith(b"data: ")
            assert loop._admitting == 0  # noqa: SLF001
            r.read()
