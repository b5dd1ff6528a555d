"""vLLM's ``stop_token_ids`` through the official ``openai`` client (``extra_body``) against a live server (tiny
model on the CPU): the first one sampled ends the choice with finish_reason "stop" and is not in its text; a
list that is not token ids of this model gets a 400 in OpenAI's envelope naming the field."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from engine.generate import generate  # noqa: E402
from engine.sampling import SamplingParams as TokenParams  # noqa: E402
from engine.serving.loop import EngineLoop  # noqa: E402
from tests.helpers import make_engine  # noqa: E402
from tests.serve_helpers import app_server  # noqa: E402

CONTEXT, N = 256, 10
USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def client(tiny_qwen2_dir):
    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=CONTEXT)).start()
    assert loop.ready.wait(60) and loop.error is None
    with app_server(loop) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine(tiny_qwen2_dir):
    """The server's engine set-up, run alone: the greedy tokens a prompt gets without stop tokens."""
    eng = make_engine(tiny_qwen2_dir, max_context=CONTEXT)
    yield eng
    eng.close()


def _greedy_and_stop(engine, ids: list[int]) -> tuple[list[int], int]:
    """The greedy tokens after ``ids`` and a step k >= 2 whose token is sampled there first."""
    out = generate(engine, [ids], TokenParams(), max_new_tokens=N).token_ids[0]
    return out, next(i for i in range(2, len(out)) if out[i] not in out[:i])


def test_completion_ends_at_a_stop_token(client, engine):
    tok = engine.tokenizer
    ref, k = _greedy_and_stop(engine, tok.encode("the cat"))
    unsampled = next(t for t in range(engine.cfg.vocab_size) if t not in ref)
    r = client.completions.create(model="m", prompt="the cat", max_tokens=N, temperature=0,
                                  extra_body={"stop_token_ids": [unsampled, ref[k]]})
    (c,) = r.choices
    assert c.finish_reason == "stop" and r.usage.completion_tokens == k
    assert c.text == tok.decode(ref[:k], skip_special_tokens=True)
    plain = client.completions.create(model="m", prompt="the cat", max_tokens=N, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == N


def test_streamed_chat_ends_at_a_stop_token(client, engine):
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template(USER, add_generation_prompt=True), add_special_tokens=False)
    ref, k = _greedy_and_stop(engine, ids)
    chunks = list(client.chat.completions.create(model="m", messages=USER, max_tokens=N, temperature=0, stream=True,
                                                 extra_body={"stop_token_ids": [ref[k]]}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tok.decode(ref[:k], skip_special_tokens=True)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("value,param,match", [
    (1088, "stop_token_ids", r"stop_token_ids names token 1088, past this model's vocabulary \[0, 1088\)"),
    (-1, "stop_token_ids.0", "greater than or equal to 0"),
    ("3", "stop_token_ids.0", "valid integer"),
    (True, "stop_token_ids.0", "valid integer"),
])
def test_a_bad_stop_token_id_is_a_400_naming_the_field(client, engine, value, param, match):
    assert engine.cfg.vocab_size == 1088
    for call in (lambda body: client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body=body),
                 lambda body: client.chat.completions.create(model="m", messages=USER, max_tokens=2, extra_body=body)):
        with pytest.raises(openai.BadRequestError, match=match) as e:
            call({"stop_token_ids": [value]})
        assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="hi", max_tokens=2, extra_body={"stop_token_ids": 3})
    assert e.value.param == "stop_token_ids"


def test_a_stop_token_ends_a_closed_format(tiny_qwen2_dir):
    """JSON mode with a stop token on a model whose tokenizer names no end of sequence: once the object is
    closed, the stop token ends the reply ("stop"), as eos would; before, nothing could end it and the reply ran
    to its length with tokens the format refused."""
    from engine.serving.params import SamplingParams
    from engine.serving.scheduler import Scheduler
    from engine.serving.sequence import Sequence
    eng = make_engine(tiny_qwen2_dir, batch=2, max_context=256)
    try:
        tok = eng.tokenizer
        assert not tok.eos_ids
        end = tok.encode("<|im_end|>", add_special_tokens=False)
        sched = Scheduler(eng)
        s = Sequence(tok.encode("give me json", add_special_tokens=False),
                     SamplingParams(max_tokens=60, temperature=0, json_object=True, stop_token_ids=end), tok)
        sched.add(s)
        while not s.finished:
            sched.step()
        assert s.finish_reason == "stop" and s.text.strip().startswith("{") and s.text.strip().endswith("}")
    finally:
        eng.close()
