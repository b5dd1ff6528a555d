"""chat_template_kwargs (vLLM's request field; LLM.chat's argument): extra chat-template variables such as Qwen3's
enable_thinking, checked before use."""

from __future__ import annotations

import pytest

from engine.serving.protocol import ChatRequest
from engine.tokenizer import Tokenizer

EMPTY_THINK = "<think>\n\n</think>"


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    from engine.synth.writer import synthesize
    return synthesize("tiny-qwen3", tmp_path_factory.mktemp("q3") / "m", dtype="bf16", seed=0)


def test_the_server_passes_them_to_the_template(qwen3_dir):
    tok = Tokenizer.from_dir(qwen3_dir)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    plain = tok.decode(ChatRequest(**ask).prompts(tok)[0])
    off = tok.decode(ChatRequest(**ask, chat_template_kwargs={"enable_thinking": False}).prompts(tok)[0])
    assert EMPTY_THINK not in plain and off.endswith(EMPTY_THINK + "\n\n")


@pytest.mark.parametrize("value,match", [({"tools": []}, "cannot set 'tools'"), ({"not a name": 1}, "must be an object")])
def test_bad_ones_are_refused(qwen3_dir, value, match):
    tok = Tokenizer.from_dir(qwen3_dir)
    with pytest.raises(ValueError, match=match):
        ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], chat_template_kwargs=value).prompts(tok)


def test_a_value_that_is_not_an_object_is_refused():
    from engine.serving.tools import template_kwargs
    with pytest.raises(ValueError, match="must be an object"):
        template_kwargs([1])


def test_llm_chat_takes_them(qwen3_dir):
    from engine import LLM, SamplingParams
    with LLM(qwen3_dir, device="cpu", dtype="fp32", kernels="torch", max_context=128) as llm:
        out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=1), use_tqdm=False,
                       chat_template_kwargs={"enable_thinking": False})
    assert out[0].prompt.endswith(EMPTY_THINK + "\n\n")
