"""What the server makes of request bodies that are not what it expects: every one gets OpenAI's error
envelope naming what is wrong, none disturbs the requests already running; a request without ``model``
is served by the served model; a body that is not sent as JSON is refused before it is read."""

from __future__ import annotations

import json
import re
import http.client

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.serving.loop import EngineLoop  # noqa: E402
from tests.helpers import make_engine  # noqa: E402
from tests.serve_helpers import app_server, open_stream, post  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def url(tiny_qwen2_dir):
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=256)).start()
    assert loop.ready.wait(60) and loop.error is None
    with app_server(loop) as u:
        yield u


def _envelope(out: dict) -> dict:
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
    return out["error"]


@pytest.mark.parametrize("path,body,match,param", [
    (CHAT, b"", r"the body is empty; send a JSON object", None),
    (CHAT, b"  \n", r"the body is empty", None),
    (CHAT, b"[1, 2]", r"the body must be a JSON object, got list", None),
    (CHAT, b"null", r"the body must be a JSON object, got null", None),
    (COMPLETIONS, b"\xff\xfe\x00", r"the body is not valid JSON", None),
    (COMPLETIONS, b'{"prompt": "hi",}', r"the body is not valid JSON \(Expecting property name", None),
    (CHAT, {"messages": [{"role": "user", "content": "ok \ud800"}]},
     r"messages\[0\]\.content is not valid Unicode: character 3 is an unpaired surrogate \(U\+D800\)", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}]},
     r"messages\[0\]\.content is not valid Unicode: .*from the byte 0xff", None),
    (COMPLETIONS, {"prompt": "a\udc80b"}, r"^prompt is not valid Unicode: character 1", None),
    (COMPLETIONS, {"prompt": ["fine", "a\udc80b"]}, r"^prompt\[1\] is not valid Unicode", None),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, r"seed: Input should be less than or equal to", "seed"),
    (COMPLETIONS, {"prompt": "hi", "seed": -2**63 - 1}, r"seed: Input should be greater than or equal to", "seed"),
])
def test_bad_bodies_get_the_envelope(url, path, body, match, param):
    status, out, _ = post(url + path, body)
    err = _envelope(out)
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    assert re.search(match, err["message"]), err["message"]


def test_model_may_be_left_out(url):
    status, out, _ = post(url + CHAT, {"messages": USER, "max_tokens": 2})
    assert status == 200 and out["model"] == "m" and out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "text/plain;charset=UTF-8", None])
def test_a_body_not_sent_as_json_is_refused_before_any_work(url, ctype):
    """curl -d's form type, and what a web page on another site can send without a CORS preflight: such a
    request must not start a generation (before: a form body was parsed as JSON and served)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)  # sends no Content-Type unless given one
    conn.request("POST", COMPLETIONS, body=json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
                 headers={"Content-Type": ctype} if ctype else {})
    r = conn.getresponse()
    err = _envelope(json.loads(r.read()))
    conn.close()
    assert r.status == 415 and "Content-Type: application/json" in err["message"], err
    assert err["message"].endswith(f"got {ctype.split(';')[0] if ctype else 'no Content-Type'}")
    with_charset = {"Content-Type": "application/json; charset=utf-8"}
    assert post(url + COMPLETIONS, {"prompt": "hi", "max_tokens": 2}, with_charset)[0] == 200


@pytest.mark.parametrize("seed,n", [(2**64 - 1, 3), (-2**63, 2), (-1, 2)])
def test_seeds_at_the_64_bit_edges_are_served_and_reproducible(url, seed, n):
    body = {"prompt": "the", "max_tokens": 4, "temperature": 1.0, "seed": seed, "n": n}
    first, second = (post(url + COMPLETIONS, body) for _ in range(2))
    assert first[0] == second[0] == 200
    assert [c["text"] for c in first[1]["choices"]] == [c["text"] for c in second[1]["choices"]]


def test_a_bad_request_leaves_the_running_ones_alone(url):
    """Before the seed had a range, a seed past 64 bits failed the engine's step and cancelled every
    request in it; now it is refused at the door and a stream already running ends normally."""
    long = {"prompt": "x", "max_tokens": 40, "stream": True, "ignore_eos": True, "temperature": 0}
    with open_stream(url + COMPLETIONS, long) as stream:
        assert stream.readline().startswith(b"data: ")
        status, out, _ = post(url + COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "temperature": 1, "seed": 2**70})
        assert status == 400 and _envelope(out)["param"] == "seed"
        events = [line.decode().strip() for line in stream if line.strip()]
    finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
    assert events[-1] == "data: [DONE]" and finishes[-1] == "length"


def test_an_internal_failure_gets_the_envelope_and_the_server_goes_on(url, monkeypatch):
    from engine.serving import protocol

    def broken(self, tokenizer):
        raise RuntimeError("a bug of ours")
    monkeypatch.setattr(protocol.ChatRequest, "prompts", broken)
    status, out, _ = post(url + CHAT, {"messages": USER})
    err = _envelope(out)
    assert status == 500 and err["type"] == "server_error" and "RuntimeError" in err["message"]
    monkeypatch.undo()
    assert post(url + CHAT, {"messages": USER, "max_tokens": 2})[0] == 200
