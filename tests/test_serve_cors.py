"""--allowed-origin: web pages of the origins named may call the API from a browser (CORS); with none named
(the default) no response carries an Access-Control-Allow-Origin header, so other sites' pages cannot
read the answers."""

from __future__ import annotations

import http.client
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.serving.loop import EngineLoop  # noqa: E402
from tests.helpers import make_engine  # noqa: E402
from tests.serve_helpers import app_server  # noqa: E402

SITE = "http://localhost:3000"
BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def _request(url: str, method: str, headers: dict, body: bytes | None = None) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, "/v1/chat/completions", body=body, headers=headers)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


@pytest.fixture
def loop(tiny_qwen2_dir):  # one each: app_server closes its loop
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=256)).start()
    assert loop.ready.wait(60) and loop.error is None
    return loop


def test_a_named_origin_passes_the_preflight_and_reads_answers(loop):
    with app_server(loop, allowed_origins=[SITE], api_key="k") as url:
        status, headers, _ = _request(url, "OPTIONS", {"Origin": SITE, "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization,content-type"})
        assert status == 200 and headers["access-control-allow-origin"] == SITE  # before the API key is asked
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers, _ = _request(url, "OPTIONS", {"Origin": "https://elsewhere.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert status == 400 and "access-control-allow-origin" not in headers
        status, headers, body = _request(url, "POST", {"Origin": SITE, "Authorization": "Bearer k",
                                                       "Content-Type": "application/json"}, BODY)
        assert status == 200 and headers["access-control-allow-origin"] == SITE
        assert json.loads(body)["usage"]["completion_tokens"] >= 1
        status, headers, _ = _request(url, "POST", {"Origin": SITE, "Content-Type": "application/json"}, BODY)
        assert status == 401  # the key is still asked for


def test_by_default_no_origin_may_read_answers(loop):
    with app_server(loop) as url:
        status, headers, _ = _request(url, "POST", {"Origin": SITE, "Content-Type": "application/json"}, BODY)
        assert status == 200 and "access-control-allow-origin" not in headers
        status, headers, _ = _request(url, "OPTIONS", {"Origin": SITE, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in headers
