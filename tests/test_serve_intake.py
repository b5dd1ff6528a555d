"""A request's intake on the event loop: token ids and short texts are tokenized there (no thread hop: session
48's burst reached the engine ~1.3 ms a request, one after another); long texts and tool-using chats go to a thread
so the loop keeps taking the others in."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

import engine.serving.app as app_mod  # noqa: E402
from engine.serving.loop import EngineLoop  # noqa: E402
from engine.serving.protocol import ChatRequest, CompletionRequest  # noqa: E402
from tests.helpers import make_engine  # noqa: E402
from tests.serve_helpers import app_server, post  # noqa: E402

LONG = "word " * 500  # 2,500 characters


@pytest.mark.parametrize("body, chars", [
    ({"prompt": [1, 2, 3]}, 0), ({"prompt": [[1, 2], [3]]}, 0), ({"prompt": "hello"}, 5),
    ({"prompt": ["ab", "cde"]}, 5), ({"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]}, 4),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     1 << 30)])
def test_text_chars_counts_what_the_tokenizer_reads(body, chars):
    model = ChatRequest if "messages" in body else CompletionRequest
    assert model.model_validate(body).text_chars() == chars


def test_only_long_texts_go_to_a_thread(tiny_qwen2_dir, monkeypatch):
    hops = []
    real = asyncio.to_thread

    async def counting(fn, *a, **k):
        hops.append(getattr(fn, "__name__", fn))
        return await real(fn, *a, **k)
    monkeypatch.setattr(app_mod.asyncio, "to_thread", counting)
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=2048)).start()
    assert loop.ready.wait(60) and loop.error is None
    with app_server(loop) as url:
        for body, hop in (({"prompt": [1, 2, 3]}, False), ({"prompt": "hello there"}, False),
                          ({"messages": [{"role": "user", "content": "hi"}]}, False),
                          ({"prompt": LONG}, True), ({"messages": [{"role": "user", "content": LONG}]}, True)):
            before = len(hops)
            status, out, _ = post(url + ("/v1/chat/completions" if "messages" in body else "/v1/completions"),
                                  {**body, "max_tokens": 2, "temperature": 0})
            assert status == 200, out
            assert (len(hops) > before) == hop, (body, hops)
