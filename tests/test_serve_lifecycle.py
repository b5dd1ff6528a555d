"""Server life cycle: loading (503), API key (401), overload (503 + Retry-After), SIGTERM (exit 0)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.serving.loop import EngineLoop  # noqa: E402
from tests.helpers import make_engine  # noqa: E402
from tests.serve_helpers import Server, app_server, get, open_stream, post  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_health_is_503_while_loading_then_200(tiny_qwen2_dir):
    gate = threading.Event()

    def load():
        gate.wait(30)
        return make_engine(tiny_qwen2_dir, batch=2, max_context=256)

    loop = EngineLoop(load).start()
    with app_server(loop) as url:
        try:
            status, body, _ = get(url + "/health")
            assert status == 503 and "loading" in body
            status, out, headers = post(url + "/v1/chat/completions", CHAT)
            assert status == 503 and out["error"]["type"] == "service_unavailable" and headers["retry-after"] == "1"
            gate.set()
            assert loop.ready.wait(30)
            assert get(url + "/health")[0] == 200
            status, out, _ = post(url + "/v1/chat/completions", CHAT)
            assert status == 200 and out["usage"]["completion_tokens"] >= 1
        finally:
            gate.set()


def test_api_key_overload_and_sigterm(tiny_qwen2_dir):
    srv = Server(tiny_qwen2_dir, "--served-model-name", "m", "--api-key", "sekret", "--max-batch", "1",
                 "--max-waiting", "1", "--max-context", "256", "--grace", "20")
    try:
        status, out, _ = post(srv.url + "/v1/chat/completions", CHAT)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
        assert post(srv.url + "/v1/chat/completions", CHAT, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(srv.url + "/health")[0] == 200  # health and metrics stay open
        auth = {"Authorization": "Bearer sekret"}
        assert post(srv.url + "/v1/chat/completions", CHAT, auth)[0] == 200
        long = {"model": "m", "prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True}
        streams = [open_stream(srv.url + "/v1/completions", long, auth) for _ in range(2)]  # 1 running, 1 waiting
        for s in streams:
            assert s.status == 200
        status, out, headers = post(srv.url + "/v1/completions", {**long, "stream": False}, auth)
        assert status == 503 and headers.get("retry-after") == "1" and "overloaded" in out["error"]["message"]
        status, out, _ = post(srv.url + "/v1/completions", {**long, "n": 3}, auth)  # never fits: not a 503
        assert status == 400 and "lower n" in out["error"]["message"]
        srv.proc.terminate()  # SIGTERM with both streams in flight: they finish within the grace period
        bodies = [s.read().decode() for s in streams]
        rc, err = srv.stop()
    finally:
        srv.stop()
    assert rc == 0, err
    assert "Traceback" not in err and "model loaded; ready" in err
    for body in bodies:
        assert body.rstrip().endswith("data: [DONE]")
        assert '"finish_reason":"length"' in body


@pytest.mark.parametrize("argv,match", [
    (["serve", "--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["serve", "--model", "/nonexistent/model-dir"], "nonexistent"),
    (["serve", "--max-batch", "0"], "--max-batch must be >= 1, got 0"),  # the server's name for it
    (["serve", "--block-size", "0"], "--block-size must be >= 1, got 0"),
    (["serve", "--grace", "-5"], "--grace must be >= 0, got -5"),
    (["serve", "--host", "203.0.113.7"], "cannot listen on 203.0.113.7"),
    (["serve", "--step-log", "/nonexistent/dir/steps.jsonl"], "--step-log /nonexistent/dir/steps.jsonl: cannot open"),
])
def test_layerstream_serve_bad_flags_exit_2(capsys, argv, match):
    from engine.run import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_sigterm_cancels_what_outlives_the_grace_period(tiny_qwen2_dir):
    srv = Server(tiny_qwen2_dir, "--served-model-name", "m", "--max-batch", "1", "--max-context", "256",
                 "--grace", "1")
    long = {"model": "m", "prompt": "x", "max_tokens": 240, "n": 16, "stream": True, "ignore_eos": True}
    try:
        stream = open_stream(srv.url + "/v1/completions", long)  # 16 x 240 tokens one at a time: seconds
        assert stream.readline().startswith(b"data: ")
        t0 = time.monotonic()
        srv.proc.terminate()
        rest = stream.read().decode()
        rc, err = srv.stop()
        elapsed = time.monotonic() - t0
    finally:
        srv.stop()
    assert rc == 0, err
    assert elapsed < 15  # cancelled after the 1 s grace rather than run to the end
    assert '"finish_reason":"abort"' in rest and rest.rstrip().endswith("data: [DONE]")  # still a whole stream


def test_engine_thread_failure_fails_requests_instead_of_hanging(tiny_qwen2_dir):
    """A step that raises aborts the running requests; a thread that dies fails the rest and says so."""
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=64)).start()
    assert loop.ready.wait(30) and loop.error is None
    from engine.serving.params import SamplingParams
    from engine.serving.sequence import Sequence

    outs = []
    loop.scheduler.runner.step = lambda seqs: (_ for _ in ()).throw(RuntimeError("boom"))
    loop.submit([Sequence([1, 2, 3], SamplingParams(max_tokens=4), loop.engine.tokenizer, sink=outs.append)])
    deadline = time.monotonic() + 10
    while not outs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outs and outs[-1].finish_reason == "abort" and loop.outstanding == 0  # the server lives on
    class Fatal(BaseException):  # escapes the per-step handler: the thread itself dies
        pass

    loop.scheduler.runner.step = lambda seqs: (_ for _ in ()).throw(Fatal("dead"))
    loop.submit([Sequence([1, 2], SamplingParams(max_tokens=4), loop.engine.tokenizer, sink=outs.append)])
    loop._thread.join(10)
    assert isinstance(loop.error, Fatal) and len(outs) == 2 and outs[-1].finish_reason == "abort"
    with pytest.raises(Exception, match="not running"):
        loop.submit([Sequence([1], SamplingParams(), loop.engine.tokenizer)])
    loop.close()


def test_a_lost_gpu_ends_the_engine_thread_and_says_why(tiny_qwen2_dir):
    """A step failing with a device-side assert (the CUDA context is gone: nothing can run after it) fails
    the running requests and ends the engine thread with an error naming the cause, which /health reports."""
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=64)).start()
    assert loop.ready.wait(30) and loop.error is None
    from engine.serving.params import SamplingParams
    from engine.serving.sequence import Sequence

    outs = []
    assert_msg = "CUDA error: device-side assert triggered"
    loop.scheduler.runner.step = lambda seqs: (_ for _ in ()).throw(RuntimeError(assert_msg))
    loop.submit([Sequence([1, 2, 3], SamplingParams(max_tokens=4), loop.engine.tokenizer, sink=outs.append)])
    loop._thread.join(10)
    assert not loop._thread.is_alive() and outs and outs[-1].finish_reason == "abort"
    assert "the GPU failed" in str(loop.error) and "restart the server" in str(loop.error)
    from engine.serving.app import create_app
    from fastapi.testclient import TestClient

    r = TestClient(create_app(loop, "m")).get("/health")
    assert r.status_code == 503 and "device-side assert" in r.json()["message"]
    loop.close()


def test_nonfinite_logits_get_an_error_response_and_the_server_goes_on(tiny_qwen2_dir):
    """Requests whose logits come out NaN: a plain one gets a 500 envelope naming the cause, a stream gets
    the error event before [DONE]; once the logits are finite again the same server answers normally."""
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=64)).start()
    assert loop.ready.wait(30) and loop.error is None
    runner, poison = loop.scheduler.runner, [True]
    for name in ("_grouped", "_padded"):
        real = getattr(runner, name)

        def poisoned(seqs, _real=real):
            logits, q_lens = _real(seqs)
            if poison[0]:
                logits[:, 3] = float("nan")
            return logits, q_lens
        setattr(runner, name, poisoned)
    body = {"model": "m", "prompt": "hello", "max_tokens": 4}
    with app_server(loop) as url:
        status, reply, _ = post(url + "/v1/completions", body)
        assert status == 500 and reply["error"]["code"] == "nonfinite_logits"
        assert "non-finite logits" in reply["error"]["message"]
        with open_stream(url + "/v1/completions", {**body, "stream": True}) as r:
            events = [line.decode().strip() for line in r if line.strip()]
        assert '"finish_reason":"abort"' in events[-3] and '"nonfinite_logits"' in events[-2]
        assert events[-1] == "data: [DONE]"
        poison[0] = False
        status, reply, _ = post(url + "/v1/completions", body)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("gather_s,first_batch", [(0.6, 2), (0.0, 1)])
def test_requests_close_together_share_the_idle_engines_first_pass(tiny_qwen2_dir, gather_s, first_batch):
    """A request that wakes the idle engine waits the gather window for others (the window restarts at
    each arrival): one sent 0.2 s later joins its first pass; without a window it meets the next pass."""
    from engine.serving.loop import gather_window
    from engine.serving.params import SamplingParams
    from engine.serving.sequence import Sequence

    batches = []
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=64), gather_s=gather_s,
                      on_step=lambda st: batches.append(st.last_batch)).start()
    assert loop.ready.wait(30) and loop.error is None
    outs = []
    for prompt in ([1, 2, 3], [4, 5, 6, 7]):
        loop.submit([Sequence(prompt, SamplingParams(max_tokens=3), loop.engine.tokenizer, sink=outs.append)])
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while loop.outstanding and time.monotonic() < deadline:
        time.sleep(0.02)
    loop.close()
    assert loop.outstanding == 0 and batches[0] == first_batch
    assert gather_window(loop.engine) == pytest.approx(min(0.025, 0.1 * loop.engine.plan.predicted_step_s))


def test_port_in_use_is_one_error_line(capsys):
    import socket

    from engine.run import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot listen on 127.0.0.1:") and err.count("\n") == 1


def test_a_receiver_gone_at_shutdown_does_not_break_the_engine_thread(tiny_qwen2_dir):
    """A stream whose event loop closed (the server shutting down while a stopped reply was still
    running) makes its sink raise RuntimeError: the engine thread keeps serving and stops cleanly."""
    from engine.serving.params import SamplingParams
    from engine.serving.sequence import Sequence

    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=64)).start()
    try:
        assert loop.ready.wait(30) and loop.error is None

        def gone(out):
            raise RuntimeError("Event loop is closed")

        outs, done = [], threading.Event()
        loop.submit([Sequence([1, 2, 3], SamplingParams(max_tokens=3), loop.engine.tokenizer, sink=gone),
                     Sequence([4, 5], SamplingParams(max_tokens=3), loop.engine.tokenizer,
                              sink=lambda o: (outs.append(o), o.finished and done.set()))])
        assert done.wait(30) and outs[-1].finish_reason == "length"
        deadline = time.monotonic() + 10
        while loop.outstanding and time.monotonic() < deadline:
            time.sleep(0.02)
        assert loop.outstanding == 0 and loop.error is None
    finally:
        loop.close()
    assert loop.error is None
