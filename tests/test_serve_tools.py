"""Tool calling in the chat API (engine.serving.tools): the parser, the request checks, the rendering against
transformers', and a live in-process server whose sampler is scripted to answer with calls."""

from __future__ import annotations

import json

import pytest

from engine.serving.protocol import ChatRequest
from engine.serving.tools import ToolCallStream, check_tools, parse_tool_calls
from engine.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call>'


def _fn(call: dict) -> tuple[str, dict]:
    return call["function"]["name"], json.loads(call["function"]["arguments"])


@pytest.mark.parametrize("text, content, calls", [
    ("no call here", "no call here", []),
    (CALL, None, [("get_weather", {"city": "Köln"})]),
    ("Let me look.\n" + CALL + "\n" + CALL.replace("Köln", "Paris"), "Let me look.",
     [("get_weather", {"city": "Köln"}), ("get_weather", {"city": "Paris"})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    ('<tool_call>{"name": "f", "parameters": {"a": 1}}</tool_call>', None, [("f", {"a": 1})]),
    ("<tool_call>not json</tool_call> tail", "<tool_call>not json</tool_call> tail", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ('<tool_call>\n{"name": "f", "arguments": {}}', None, [("f", {})]),  # stopped before the closing tag
    ("<tool_call>\n{\"name\": \"f\", \"argu", "<tool_call>\n{\"name\": \"f\", \"argu", []),  # cut short
    ("a < b and <tool", "a < b and <tool", []),
])
def test_parse(text, content, calls):
    got_content, got = parse_tool_calls(text)
    assert got_content == content
    assert [_fn(c) for c in got] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)


@pytest.mark.parametrize("text", ["Sure.\n" + CALL + " done", CALL + CALL, "x <tool_ca y",
                                  "<tool_call>oops</tool_call>"])
def test_streamed_text_split_anywhere_gives_the_same_content_and_calls(text):
    whole_content, whole_calls = parse_tool_calls(text)
    for cut in range(len(text) + 1):
        for step in (1, 3, len(text) + 1):
            s, parts = ToolCallStream(), []
            pieces = [text[:cut]] + [text[i:i + step] for i in range(cut, len(text), step)]
            parts = [s.feed(piece) for piece in pieces] + [s.finish()]
            content = "".join(parts)
            assert ((content.strip() or None) if s.calls else content) == whole_content
            assert [_fn(c) for c in s.calls] == [_fn(c) for c in whole_calls]


def test_only_what_may_open_a_call_is_held_back():
    s = ToolCallStream()
    assert s.feed("Hello <tool") == "Hello "
    assert s.feed("s are") == "<tools are"
    assert s.feed(" <tool_call>{") == " "
    assert s.feed('"name": "f"}</tool_call>!') == "!" and [_fn(c) for c in s.calls] == [("f", {})]


@pytest.mark.parametrize("tools, choice, match", [
    ([{"type": "code_interpreter"}], None, r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "has space"}}], None, "function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "parameters"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "not among the request's tools"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([], "required", "needs tools"),
])
def test_requests_the_server_cannot_serve_are_refused(tools, choice, match):
    with pytest.raises(ValueError, match=match):
        check_tools(tools, choice, "{{ '<tool_call>' }}")


def test_a_template_without_the_call_format_is_refused_and_none_renders_no_tools():
    with pytest.raises(ValueError, match="no tool-call format"):
        check_tools([WEATHER], "auto", "{{ messages }}")
    assert check_tools([WEATHER], "none", "{{ messages }}") == (False, None)
    assert check_tools([], None, None) == (False, None)
    assert check_tools([WEATHER], "required", "<tool_call>") == (True, ("get_weather",))
    named = {"type": "function", "function": {"name": "get_weather"}}
    two = [WEATHER, {**WEATHER, "function": {"name": "f"}}]
    assert check_tools(two, named, "<tool_call>") == (True, ("get_weather",))


CONVERSATION = [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Köln and Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Köln"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "18C"}]


def test_tools_and_calls_render_as_transformers_renders_them(tiny_qwen2_dir):
    """The request's tools, an assistant turn's calls (OpenAI's JSON-string arguments) and the tool results."""
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    ids = ChatRequest(messages=CONVERSATION, tools=[WEATHER]).prompts(tok)[0]
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    def hf_call(c: dict) -> dict:  # transformers' templates take arguments as objects
        return {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}

    as_hf = [{**m, "tool_calls": [hf_call(c) for c in m["tool_calls"]]} if "tool_calls" in m
             else {**m, "content": m["content"] or ""} for m in CONVERSATION]
    expected = hf.apply_chat_template(as_hf, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert "<tools>" in expected and "<tool_response>\n12C\n</tool_response>" in expected
    plain = ChatRequest(messages=CONVERSATION[:2], tools=[WEATHER], tool_choice="none").prompts(tok)[0]
    assert "<tools>" not in tok.decode(plain, skip_special_tokens=False)


openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def scripted(tiny_qwen2_dir):
    """A live in-process server whose sampler answers every request with SCRIPT's tokens, then <|im_end|>."""
    from engine.serving.loop import EngineLoop
    from engine.serving.runner import ModelRunner
    from tests.helpers import make_engine
    from tests.serve_helpers import app_server

    engine = make_engine(tiny_qwen2_dir, batch=2, max_context=1024)
    tok = engine.tokenizer
    end = tok.token_to_id("<|im_end|>")
    tok.eos_ids = {end}
    script = {"text": ""}

    def sample(self, logits, seqs):
        if self.engine is not engine:  # another test's engine: its own sampler
            return original(self, logits, seqs)
        ids = tok.encode(script["text"], add_special_tokens=False) + [end]
        return [ids[min(len(s.output_ids), len(ids) - 1)] for s in seqs]

    original = ModelRunner.sample
    patch = pytest.MonkeyPatch()
    patch.setattr(ModelRunner, "sample", sample)
    loop = EngineLoop(lambda: engine).start()
    with app_server(loop) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), script
    patch.undo()


def test_the_models_calls_come_back_as_tool_calls(scripted):
    client, script = scripted
    script["text"] = "Checking.\n" + CALL
    r = client.chat.completions.create(model="m", messages=CONVERSATION[1:2], tools=[WEATHER], max_tokens=100)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [("get_weather",
                                                                                             {"city": "Köln"})]


def test_streamed_calls_arrive_whole_with_their_index(scripted):
    client, script = scripted
    script["text"] = CALL + "\n" + CALL.replace("Köln", "Paris")
    chunks = list(client.chat.completions.create(model="m", messages=CONVERSATION[1:2], tools=[WEATHER],
                                                 max_tokens=100, stream=True))
    calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Köln"}), (1, "get_weather", {"city": "Paris"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks).strip() == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_keeps_one_call(scripted):
    client, script = scripted
    script["text"] = CALL + "\n" + CALL.replace("Köln", "Paris")
    for stream in (False, True):
        kw = dict(model="m", messages=CONVERSATION[1:2], tools=[WEATHER], max_tokens=100, parallel_tool_calls=False)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])]
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        else:
            msg = client.chat.completions.create(**kw).choices[0].message
            calls, text = msg.tool_calls, msg.content or ""
        assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Köln"}] and text.strip() == ""


def test_without_tools_the_same_text_stays_text(scripted):
    client, script = scripted
    script["text"] = CALL
    r = client.chat.completions.create(model="m", messages=CONVERSATION[1:2], max_tokens=100)
    assert r.choices[0].message.content == CALL and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls


def test_a_conversation_with_tool_results_is_served_and_bad_tools_get_the_envelope(scripted):
    client, script = scripted
    script["text"] = "It is 12C in Köln and 18C in Paris."
    r = client.chat.completions.create(model="m", messages=CONVERSATION, tools=[WEATHER], max_tokens=100)
    assert r.choices[0].message.content == script["text"] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="not among the request's tools"):
        client.chat.completions.create(model="m", messages=CONVERSATION[1:2], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    r = client.chat.completions.create(model="m", messages=CONVERSATION[1:2], max_tokens=5)  # still serving
    assert r.choices[0].finish_reason in ("stop", "length")


def test_the_python_api_offers_tools_and_parses_the_calls(tiny_qwen2_dir, monkeypatch):
    from engine import LLM, SamplingParams
    from engine.serving.runner import ModelRunner

    with LLM(tiny_qwen2_dir, device="cpu", dtype="fp32", kernels="torch", max_batch=2) as llm:
        end = llm.tokenizer.token_to_id("<|im_end|>")
        ids = llm.tokenizer.encode(CALL, add_special_tokens=False) + [end]
        monkeypatch.setattr(ModelRunner, "sample", lambda self, logits, seqs: [
            ids[min(len(s.output_ids), len(ids) - 1)] for s in seqs])
        params = SamplingParams(max_tokens=len(ids) + 2)
        with_tools, without = (llm.chat(CONVERSATION[:2], params, use_tqdm=False, tools=t)[0]
                               for t in ([WEATHER], None))
        after_results = llm.chat(CONVERSATION, params, use_tqdm=False, tools=[WEATHER])[0]
    assert [_fn(c) for c in with_tools.outputs[0].tool_calls] == [("get_weather", {"city": "Köln"})]
    assert "<tools>" in with_tools.prompt and "<tools>" not in without.prompt
    assert without.outputs[0].tool_calls is None and without.outputs[0].text == CALL
    assert '"arguments": {"city": "Paris"}' in after_results.prompt  # the client's JSON-string arguments


@pytest.mark.parametrize("calls", [[{"function": "f"}], [{"function": {"name": 3}}], [{"type": "function"}]])
def test_an_assistant_turns_malformed_calls_are_named(calls, tiny_qwen2_dir):
    tok = Tokenizer.from_dir(tiny_qwen2_dir)
    req = ChatRequest(messages=[{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": None, "tool_calls": calls}])
    with pytest.raises(ValueError, match=r"tool_calls\[0\] must be"):
        req.prompts(tok)


def _format_prefix(tok, names, text: str) -> bool:
    from engine.serving.constrain import Format, call_format

    f = Format(tok, call_format(names))
    return f._feed(text.encode("utf-8")) is not None


def test_a_forced_choice_holds_even_a_random_models_reply_to_the_call(tiny_qwen2_dir):
    """The tiny random model never closes the arguments within the budget; its reply is still the start of
    exactly the call the format allows."""
    from engine import LLM, SamplingParams

    named = {"type": "function", "function": {"name": "get_weather"}}
    with LLM(tiny_qwen2_dir, device="cpu", dtype="fp32", kernels="torch", max_batch=2, max_context=1024) as llm:
        for choice in ("required", named):
            out = llm.chat(CONVERSATION[:2], SamplingParams(max_tokens=60, temperature=1.0, seed=2), use_tqdm=False,
                           tools=[WEATHER, {"type": "function", "function": {"name": "get_time"}}],
                           tool_choice=choice)[0].outputs[0]
            assert out.text.startswith('<tool_call>\n{"name": "get_'), out.text
            assert _format_prefix(llm.tokenizer, ("get_weather", "get_time") if choice == "required" else
                                  ("get_weather",), out.text), out.text


def test_the_real_model_forced_to_call_a_tool_makes_one_whole_call(smollm2, one_torch_thread):
    """SmolLM2 speaks ChatML, so the synthetic Qwen2.5 template (which offers tools) renders its prompts."""
    from engine import LLM, SamplingParams
    from engine.synth.presets import QWEN25_CHAT_TEMPLATE

    named = {"type": "function", "function": {"name": "get_weather"}}
    with LLM(smollm2, device="cpu", dtype="fp32", kernels="torch", max_batch=1, max_context=1024) as llm:
        llm.tokenizer.chat_template, llm.tokenizer._template = QWEN25_CHAT_TEMPLATE, None
        out = llm.chat(CONVERSATION[1:2], SamplingParams(max_tokens=60), use_tqdm=False, tools=[WEATHER],
                       tool_choice=named)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    assert [c["function"]["name"] for c in out.tool_calls] == ["get_weather"], out.text
    assert isinstance(json.loads(out.tool_calls[0]["function"]["arguments"]), dict)
