"""The model's own sampling settings for what a server request leaves out (engine.generation_defaults): read from
generation_config.json and a GGUF's general.sampling.* keys, checked, applied field by field under the request's own
values, and end to end through a live server (CPU, tiny-qwen2)."""

from __future__ import annotations

import logging

import pytest

from engine.engine import EngineOptions, open_model
from engine.generate import generate
from engine.generation_defaults import describe, from_dir, from_gguf, sampling_defaults
from engine.sampling import SamplingParams as TokenParams
from engine.serving.protocol import ChatRequest, CompletionRequest
from tests.helpers import linked_model
from tests.serve_helpers import Server, post

QWEN = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}  # tiny-qwen2's (Qwen2.5's)


def test_the_synthesized_qwen_directory_names_its_settings(tiny_qwen2_dir):
    assert from_dir(tiny_qwen2_dir) == QWEN
    assert open_model(tiny_qwen2_dir).sampling == QWEN
    assert describe(QWEN) == "temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05"
    assert describe({}) == "none"


def test_bad_values_are_left_out_with_a_warning(caplog):
    raw = {"temperature": "hot", "top_p": 0.0, "top_k": 2.5, "min_p": 0.05, "repetition_penalty": float("nan"),
           "do_sample": False, "max_new_tokens": 9}
    with caplog.at_level(logging.WARNING, logger="engine.generation_defaults"):
        assert sampling_defaults(raw, "x/generation_config.json") == {"min_p": 0.05}
    text = caplog.text
    assert all(f"ignoring {k}=" in text for k in ("temperature", "top_p", "top_k", "repetition_penalty"))
    assert "x/generation_config.json" in text
    assert sampling_defaults({"top_k": 40.0, "temperature": 0}, "s") == {"top_k": 40, "temperature": 0.0}
    assert sampling_defaults({"min_p": 1.0, "top_p": 1.0, "temperature": 2.5}, "s") == {"top_p": 1.0}


def test_gguf_sampling_keys():
    meta = {"general.sampling.temp": 0.6, "general.sampling.top_k": 40, "general.sampling.top_p": 0.95,
            "general.sampling.min_p": 0.05, "general.sampling.penalty_repeat": 1.1, "general.name": "m"}
    assert from_gguf(meta, "m.gguf") == {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
                                         "repetition_penalty": 1.1}
    assert from_gguf({}, "m.gguf") == {}


@pytest.mark.parametrize("kind", [ChatRequest, CompletionRequest])
def test_a_requests_own_fields_win_field_by_field(kind):
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]} if kind is ChatRequest else \
        {"model": "m", "prompt": "x"}
    left_out = kind(**body).sampling(8, QWEN)
    assert (left_out.temperature, left_out.top_p, left_out.top_k, left_out.min_p, left_out.repetition_penalty) == \
        (0.7, 0.8, 20, 0.0, 1.05)
    mixed = kind(**body, temperature=0, top_k=-1).sampling(8, QWEN)
    assert (mixed.temperature, mixed.top_p, mixed.top_k, mixed.repetition_penalty) == (0.0, 0.8, 0, 1.05)
    openai = kind(**body).sampling(8)
    assert (openai.temperature, openai.top_p, openai.top_k, openai.min_p, openai.repetition_penalty) == \
        (1.0, 1.0, 0, 0.0, 1.0)


@pytest.fixture(scope="module")
def greedy_dir(tiny_qwen2_dir, tmp_path_factory):
    """tiny-qwen2's files (linked) whose generation_config.json asks for greedy decoding (temperature 0)."""
    return linked_model(tiny_qwen2_dir, tmp_path_factory.mktemp("greedy-model"),
                        generation_config={"temperature": 0, "repetition_penalty": 1.0})


def test_a_live_server_applies_them_unless_told_openai(greedy_dir):
    from engine.engine import Engine
    engine = Engine(greedy_dir, EngineOptions(device="cpu", dtype="fp32", kernels="torch", max_context=256))
    ids = engine.tokenizer.encode("the cat sat")
    want = engine.tokenizer.decode(generate(engine, [ids], TokenParams(), max_new_tokens=8).token_ids[0],
                                   skip_special_tokens=True)
    engine.close()
    body = {"model": "m", "prompt": "the cat sat", "max_tokens": 8, "ignore_eos": True}
    srv = Server(greedy_dir, "--served-model-name", "m", "--max-context", "256", "--max-batch", "2")
    try:
        texts = [post(srv.url + "/v1/completions", {**body, "seed": s})[1]["choices"][0]["text"] for s in (1, 2)]
    finally:
        code, err = srv.stop()
    assert texts == [want, want]  # no temperature in the request: the model's 0, greedy whatever the seed
    assert code == 0 and "the model's sampling settings: temperature 0, top_p 0.8, top_k 20" in err
    srv = Server(greedy_dir, "--served-model-name", "m", "--max-context", "256", "--max-batch", "2",
                 "--generation-config", "openai")
    try:
        texts = {post(srv.url + "/v1/completions", {**body, "seed": s})[1]["choices"][0]["text"] for s in range(4)}
    finally:
        code, err = srv.stop()
    assert len(texts) > 1 and "sampling settings" not in err  # temperature 1: the seeds differ


def test_a_gguf_written_from_the_directory_carries_them(tiny_qwen2_dir, tmp_path):
    """Our GGUF writer copies temperature / top_k / top_p / min_p into general.sampling.* (gguf-py's own writer
    keys, as llama.cpp's converter does; it reads no repetition_penalty), and open_model reads them back."""
    from engine.gguf.writer import write_gguf
    path = write_gguf(tiny_qwen2_dir, tmp_path / "m.gguf", "F32")[0]
    got = open_model(path).sampling
    assert set(got) == {"temperature", "top_p", "top_k"} and got["top_k"] == 20
    assert got["temperature"] == pytest.approx(0.7) and got["top_p"] == pytest.approx(0.8)  # stored as float32
