"""The server with the paged KV cache (--kv-cache paged): a shared system prompt's blocks reused, consistent
answers under load whether a prefix came from cached blocks or was computed, and a disconnect's blocks freed."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serve_helpers import Server, open_stream, post  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_paged_server_reuses_a_shared_system_prompt(tiny_qwen2_dir, tmp_path):
    steps = tmp_path / "steps.jsonl"
    srv = Server(tiny_qwen2_dir, "--served-model-name", "m", "--kv-cache", "paged", "--block-size", "8",
                 "--max-context", "256", "--max-batch", "2", "--step-log", str(steps))
    try:
        system = {"role": "system", "content": "Answer briefly and politely, please. " * 4}
        replies = []
        for question in ("first?", "second?", "first?"):
            body = {**CHAT, "messages": [system, {"role": "user", "content": question}], "temperature": 0}
            status, out, _ = post(srv.url + "/v1/chat/completions", body)
            assert status == 200
            replies.append(out["choices"][0]["message"]["content"])
        assert replies[2] == replies[0]  # the same prompt from cached blocks: the same greedy reply
        assert srv.metric("layerstream_prefix_cache_hit_tokens_total") >= 2 * 8
        assert srv.metric("layerstream_kv_blocks_total") == 2 * 256 // 8
        assert srv.metric("layerstream_kv_blocks_in_use") == 0 and srv.metric("layerstream_kv_blocks_cached") > 0
    finally:
        rc, err = srv.stop()
    assert rc == 0, err
    lines = [json.loads(line) for line in steps.read_text().splitlines()]  # --step-log: a line per step
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1)) and len(lines) >= 3
    assert all(r["batch"] == 1 and r["tokens"] >= 1 and r["step_s"] > 0 and r["waiting"] == 0 for r in lines)
    # the engine thread's CPU time in each step: positive, and within its wall time (plus the clocks' granularity)
    assert all(0 < r["cpu_s"] <= r["step_s"] + 0.01 for r in lines)
    assert all(a["start_s"] + a["step_s"] <= b["start_s"] + 1e-6 for a, b in zip(lines, lines[1:]))
    assert lines[-1]["generated_total"] == sum(1 for r in lines)  # batch 1: one token a step (3 replies)


def test_paged_server_under_load_gives_consistent_answers(tiny_qwen2_dir):
    """100 requests from 16 clients over 8 prompts sharing a prefix: every answer complete, and equal for equal
    prompts whether its prefix came from cached blocks or was computed."""
    import asyncio

    openai = pytest.importorskip("openai")
    srv = Server(tiny_qwen2_dir, "--served-model-name", "m", "--kv-cache", "paged", "--block-size", "4",
                 "--max-batch", "4", "--max-context", "96")
    prefix = "shared words for every prompt here " * 2

    async def main():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                r = await client.completions.create(model="m", prompt=prefix + f"item {i % 8}", max_tokens=6,
                                                    temperature=0, extra_body={"ignore_eos": True})
                return i % 8, r.choices[0].text, r.usage.completion_tokens

        return await asyncio.gather(*(one(i) for i in range(100)))

    try:
        results = asyncio.run(main())
        hits = srv.metric("layerstream_prefix_cache_hit_tokens_total")
        in_use = srv.metric("layerstream_kv_blocks_in_use")
    finally:
        rc, err = srv.stop()
    assert rc == 0, err
    assert len(results) == 100 and all(n == 6 for _, _, n in results)
    by_prompt: dict[int, set[str]] = {}
    for k, text, _ in results:
        by_prompt.setdefault(k, set()).add(text)
    assert all(len(texts) == 1 for texts in by_prompt.values()), by_prompt
    assert hits > 0 and in_use == 0


def test_paged_disconnect_mid_stream_frees_its_blocks(tiny_qwen2_dir):
    """A streaming client that goes away: its sequence and its KV blocks are freed at the next step."""
    srv = Server(tiny_qwen2_dir, "--served-model-name", "m", "--kv-cache", "paged", "--block-size", "4",
                 "--max-batch", "2", "--max-context", "256")
    body = {"model": "m", "prompt": "keep going", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        before = srv.metric("layerstream_generation_tokens_total")
        with open_stream(srv.url + "/v1/completions", body) as r:
            assert r.readline().startswith(b"data: ")
            held = srv.metric("layerstream_kv_blocks_in_use")  # then the connection closes
        deadline = time.monotonic() + 10
        while srv.metric("layerstream_kv_blocks_in_use") and time.monotonic() < deadline:
            time.sleep(0.1)
        in_use, running = srv.metric("layerstream_kv_blocks_in_use"), srv.metric("layerstream_requests_running")
        made = srv.metric("layerstream_generation_tokens_total") - before
    finally:
        rc, err = srv.stop()
    assert rc == 0, err
    assert held > 0 and in_use == 0 and running == 0 and made < 150
