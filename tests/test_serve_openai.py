"""The server with the official ``openai`` client, live on 127.0.0.1, tiny model on the CPU."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import re
import time

import pytest

openai = pytest.importorskip("openai")

from engine.engine import Engine, EngineOptions  # noqa: E402
from engine.generate import generate  # noqa: E402
from engine.sampling import SamplingParams as TokenParams  # noqa: E402
from tests.serve_helpers import Server, get, open_stream, post  # noqa: E402

MODEL = "tiny"
CONTEXT = 256


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir):
    # OpenAI's sampling defaults: the tests name what they ask for (tests/test_generation_defaults.py: the model's)
    srv = Server(tiny_qwen2_dir, "--served-model-name", MODEL, "--max-batch", "4", "--max-waiting", "40",
                 "--max-context", str(CONTEXT), "--prefill-chunk", "64", "--generation-config", "openai")
    yield srv
    rc, err = srv.stop()
    assert rc == 0, err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_qwen2_dir):
    """Greedy text and token count of a prompt run alone through engine.generate (batch 1)."""
    engine = Engine(tiny_qwen2_dir, EngineOptions(device="cpu", dtype="fp32", kernels="torch",
                                                  max_context=CONTEXT, threads=1))
    tok = engine.tokenizer

    def run(prompt: str, n: int, chat: bool = False) -> tuple[str, int]:
        if chat:
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False)
        else:
            ids = tok.encode(prompt)
        out = generate(engine, [ids], TokenParams(), max_new_tokens=n).token_ids[0]
        return tok.decode(out, skip_special_tokens=True), len(out)

    yield run
    engine.close()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, body, _ = get(server.url + "/health")
    assert status == 200 and '"ok"' in body
    status, body, _ = get(server.url + "/")
    assert status == 200 and "<html" in body.lower()


def test_chat_greedy_matches_the_engine(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=12, temperature=0)
    text, n = reference("hello there", 12, chat=True)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n


def test_completion_stream_with_usage(client, reference):
    plain = client.completions.create(model=MODEL, prompt="the cat", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="the cat", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text, n = reference("the cat", 10)
    assert plain.choices[0].text == text and plain.usage.completion_tokens == n
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_shape_and_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "stream": True}
    with open_stream(server.url + "/v1/chat/completions", body) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.decode().strip() for line in r if line.strip()]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert '"role":"assistant"' in events[0] and '"object":"chat.completion.chunk"' in events[0]


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="stop here", max_tokens=16, temperature=0)
    text = full.choices[0].text
    m = re.search(r"\S\S", text[2:])
    assert m, f"no stop string candidate in {text!r}"
    stop = m.group(0)
    r = client.completions.create(model=MODEL, prompt="stop here", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.find(stop)]


def test_n_and_seed_reproducibility(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "a story"}], max_tokens=12, temperature=1.0, n=3,
              extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=42, **kw)
    b = client.chat.completions.create(seed=42, **kw)
    c = client.chat.completions.create(seed=7, **kw)
    texts = [ch.message.content for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2] and len(set(texts)) > 1  # choice i draws with seed + i
    assert [ch.message.content for ch in b.choices] == texts
    assert [ch.message.content for ch in c.choices] != texts
    assert a.usage.completion_tokens == 3 * 12 and a.usage.prompt_tokens > 0  # the prompt is counted once
    assert all(ch.finish_reason == "length" for ch in a.choices)


def test_concurrent_requests_get_their_own_tokens(client, reference):
    jobs = [(f"prompt number {i} " * (1 + 3 * (i % 4)), 4 + 3 * (i % 5)) for i in range(10)]

    def one(job):
        prompt, n = job
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(10) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, n), text in zip(jobs, got):
        assert text == reference(prompt, n)[0], prompt


def test_disconnect_mid_stream_frees_the_slot(server):
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = server.metric("layerstream_generation_tokens_total")
    with open_stream(server.url + "/v1/completions", body) as r:
        assert r.readline().startswith(b"data: ")  # then the connection closes
    deadline = time.monotonic() + 10
    while server.metric("layerstream_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("layerstream_requests_running") == 0 and server.metric("layerstream_kv_slots_in_use") == 0
    assert server.metric("layerstream_generation_tokens_total") - before < 150


@pytest.mark.parametrize("body,status,match", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}, 400,
     r"context holds 256 tokens, but \d+ prompt tokens \+ 1000 max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "logprobs: true"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}, 400,
     "top_logprobs"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     400, "response_format json_schema must be"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
      "ignore_eos": True}, 400, "leave ignore_eos off"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, 400,
     "deprecated form of tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "modalities": ["text", "audio"]}, 400,
     "text only"),
])
def test_bad_requests_get_the_error_envelope(server, body, status, match):
    code, out, _ = post(server.url + "/v1/chat/completions", body)
    assert code == status
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert re.search(match, out["error"]["message"]), out


def test_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="x", suffix="y")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=10_000)


def test_load_200_requests_from_32_clients(server):
    """Every response complete (4 tokens, finish_reason length), half of them streamed; nothing lost."""
    async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def main():
        sem = asyncio.Semaphore(32)

        async def one(i):
            async with sem:
                if i % 2:
                    r = await async_client.completions.create(model=MODEL, prompt=f"load {i}", max_tokens=4,
                                                              temperature=0, extra_body={"ignore_eos": True})
                    return r.usage.completion_tokens, r.choices[0].finish_reason
                stream = await async_client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"load {i}"}], max_tokens=4, temperature=0,
                    stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                chunks = [c async for c in stream]
                return chunks[-1].usage.completion_tokens, [c for c in chunks if c.choices][-1].choices[0].finish_reason

        return await asyncio.gather(*(one(i) for i in range(200)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == 200 and all(r == (4, "length") for r in results), results
    print(f"200 requests, 32 clients: {elapsed:.1f} s")


def test_disconnect_of_a_plain_request_frees_the_slot(server):
    import json
    import socket

    body = json.dumps({"model": MODEL, "prompt": "wait", "max_tokens": 240, "temperature": 0, "n": 16,
                       "ignore_eos": True}).encode()  # 16 x 240 tokens through 4 slots: a few seconds
    before = server.metric("layerstream_generation_tokens_total")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while not server.metric("layerstream_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 10  # the socket is closed: the server notices within a poll interval
    while server.metric("layerstream_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("layerstream_requests_running") == 0
    assert server.metric("layerstream_generation_tokens_total") - before < 16 * 240 / 2


def test_unknown_route_gets_the_envelope(server):
    code, out, _ = post(server.url + "/v1/embeddings", {"model": MODEL, "input": "x"})
    assert code == 404 and set(out["error"]) == {"message", "type", "param", "code"}


def test_completion_batch_of_prompts(client, reference):
    r = client.completions.create(model=MODEL, prompt=["the cat", "a dog sat"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts[0] == texts[1] == reference("the cat", 6)[0] and texts[2] == texts[3] == reference("a dog sat", 6)[0]
    single = client.completions.create(model=MODEL, prompt="a dog sat", max_tokens=1)
    assert r.usage.prompt_tokens == client.completions.create(model=MODEL, prompt="the cat", max_tokens=1) \
        .usage.prompt_tokens + single.usage.prompt_tokens  # each prompt counted once


@pytest.fixture(scope="module")
def raw_logprobs(tiny_qwen2_dir):
    """log_softmax of the model's logits after prompt + tokens, straight through Model.forward."""
    import torch

    from engine.kv_cache import KVCache

    engine = Engine(tiny_qwen2_dir, EngineOptions(device="cpu", dtype="fp32", kernels="torch", max_context=CONTEXT))

    def run(ids: list[int]) -> torch.Tensor:
        cache = KVCache(engine.cfg, 1, CONTEXT, torch.float32, "cpu")
        n = len(ids)
        logits = engine.model.forward(torch.tensor([ids]), torch.tensor([0], dtype=torch.int32),
                                      torch.tensor([n], dtype=torch.int32), cache, n)
        return torch.log_softmax(logits[0, : engine.cfg.vocab_size], -1)

    yield run, engine.tokenizer
    engine.close()


def test_logprobs_chat_and_completions(client, raw_logprobs):
    run, tok = raw_logprobs
    r = client.completions.create(model=MODEL, prompt="the cat", max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    ids = tok.encode("the cat")
    for i, (token, value, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        ref = run(ids)
        best = int(ref.argmax())
        assert token == tok.decode([best]) and value == pytest.approx(float(ref[best]), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(value, abs=1e-6)
        ids.append(best)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                            temperature=0, logprobs=True, stream=True)
    streamed = [c for ch in stream if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2).choices[0].logprobs is None


def test_json_mode_holds_the_reply_to_one_json_object(client):
    """The tiny random model never closes its object within the budget; what it says is still a JSON prefix
    (tests/test_serve_json.py: the real SmolLM2 closes one)."""
    from engine.serving import json_mode

    for stream in (False, True):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=60, temperature=1.0,
                  seed=3, response_format={"type": "json_object"})
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        assert text.lstrip().startswith("{") and json_mode.feed(json_mode.START, text) is not None, text


def test_logit_bias_steers_and_bans_tokens(client, server):
    """OpenAI's logit_bias: +100 on a token makes greedy decoding take it every step, -100 keeps it out; a key
    that is not a token id, a bias past 100 or a token past the vocabulary is a 400."""
    kw = dict(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=0)
    plain = client.completions.create(**kw).choices[0].logprobs.tokens
    forced = client.completions.create(logit_bias={"42": 100}, **kw).choices[0].logprobs.tokens
    other = client.completions.create(logit_bias={"42": -100, "43": 100}, **kw).choices[0].logprobs.tokens
    assert len(set(forced)) == 1 and len(set(other)) == 1 and forced[0] != other[0]
    assert forced != plain or plain == forced[:1] * 4
    for bias, match in (({"x": 1}, "token ids"), ({"42": 101}, "logit_bias"), ({"99999999": 1}, "past this model"),
                        ({"\u00b2": 1}, "decimal digits"), ({"\u0661": 1}, "decimal digits")):  # "²", Arabic-Indic 1
        code, out, _ = post(server.url + "/v1/completions", {**kw, "logit_bias": bias})
        assert code == 400 and re.search(match, out["error"]["message"]), out
        assert out["error"]["param"] == "logit_bias", out


def test_stop_takes_at_most_32_strings(client, server):
    """Each stop string is matched against every new token on the engine's thread: a request with thousands of
    them slowed every other request 7-9x (a fuzzer's find). More than 32 is a 400 naming ``stop``; 32 run."""
    kw = dict(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    code, out, _ = post(server.url + "/v1/completions", {**kw, "stop": [f"zq{i}" for i in range(33)]})
    assert code == 400 and out["error"]["param"] == "stop" and "at most 32 strings, got 33" in out["error"]["message"]
    assert client.completions.create(stop=[f"zq{i}" for i in range(32)], **kw).choices[0].finish_reason == "length"
    code, out, _ = post(server.url + "/v1/completions", {**kw, "stop": ["ok", ""]})
    assert code == 400 and out["error"]["param"] == "stop", out
