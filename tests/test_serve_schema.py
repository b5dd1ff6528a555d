"""Structured outputs (response_format json_schema): the compiled recogniser against instances and violations,
pydantic's own schemas and validation of the real SmolLM2's replies, and the server."""

from __future__ import annotations

import json
import random
from typing import Literal

import pytest

from engine.serving.schema import compile_schema

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": ["string", "null"]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b c", "é"]}, "maxItems": 3},
    "score": {"type": "number"}, "ok": {"type": "boolean"}, "extra": {}},
    "required": ["name", "age", "tags"]}


def accepts(node, text: str) -> tuple[bool, bool]:
    """(every prefix accepted, the whole complete)."""
    state = node.start
    for ch in text:
        state = node.step(state, ch)
        if state is None:
            return False, False
    return True, node.complete(state)


def _instance(rng: random.Random) -> dict:
    out = {"name": rng.choice(["", "Al\"ice", "\u4e2d"]), "age": rng.choice([0, -3, 41])}
    if rng.random() < 0.5:
        out["email"] = rng.choice([None, "a@b.c"])
    out["tags"] = rng.sample(["a", "b c", "é"], rng.randint(0, 3))
    for key, values in (("score", [1.5, -0.0, 2e-9, 7]), ("ok", [True, False]), ("extra", [None, [1, {"x": []}], "s"])):
        if rng.random() < 0.5:
            out[key] = rng.choice(values)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_instances_in_the_schemas_order_are_accepted_and_complete(seed):
    node, rng = compile_schema(PERSON), random.Random(seed)
    for _ in range(40):
        text = json.dumps(_instance(rng), indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
        assert accepts(node, text) == (True, True), text


@pytest.mark.parametrize("text", [
    '{"age": 1, "name": "x", "tags": []}',  # out of the schema's order
    '{"name": "x", "tags": []}',  # a required property left out
    '{"name": "x", "age": 1.5, "tags": []}',  # an integer with a fraction
    '{"name": "x", "age": 1, "tags": ["d"]}',  # not in the enum
    '{"name": "x", "age": 1, "tags": ["a", "a", "a", "a"]}',  # more than maxItems
    '{"name": "x", "age": 1, "tags": [], "other": 1}',  # a property the schema does not name
    '{"name": 3, "age": 1, "tags": []}', '{"name": "x", "age": 1, "tags": [], "ok": 1}',
    '{"name": "x", "age": 1, "tags": [], "email": false}', '[]', ' {"name": "x", "age": 1, "tags": []}'])
def test_violations_are_refused(text):
    assert accepts(compile_schema(PERSON), text) != (True, True)


@pytest.mark.parametrize("schema, match", [
    ({"type": "string", "pattern": "^a"}, "'pattern' is not supported"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"$ref": "#/$defs/A"}}},
     "recursive"),
    ({"$ref": "#/$defs/Missing"}, "does not name"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "requires 'b'"),
    ({"type": "tuple"}, "type 'tuple'"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems"),
])
def test_schemas_that_cannot_be_held_are_named(schema, match):
    with pytest.raises(ValueError, match=match):
        compile_schema(schema)


def _pydantic_models():
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):
        city: str
        zip_code: str | None = None

    class Person(pydantic.BaseModel):
        name: str
        age: int
        role: Literal["admin", "user"]
        addresses: list[Address]

    return Person


def test_pydantics_schemas_compile_and_what_they_accept_validates():
    person = _pydantic_models()
    node = compile_schema(person.model_json_schema())
    value = person(name="Bo", age=7, role="user", addresses=[{"city": "Köln"}, {"city": "Rome", "zip_code": "1"}])
    text = value.model_dump_json()
    assert accepts(node, text) == (True, True)
    assert person.model_validate_json(text) == value
    assert accepts(node, text.replace('"user"', '"guest"'))[0] is False


def test_the_real_model_fills_a_pydantic_schema(smollm2, one_torch_thread):
    from engine import LLM, SamplingParams

    person = _pydantic_models()
    schema = json.dumps(person.model_json_schema(), sort_keys=True)
    ask = [{"role": "user", "content": "Describe Alice, 30, an admin living in Paris, as JSON."}]
    with LLM(smollm2, device="cpu", dtype="fp32", kernels="torch", max_batch=1, max_context=1024) as llm:
        out = llm.chat(ask, SamplingParams(max_tokens=120, json_schema=schema), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    person.model_validate_json(out.text)  # pydantic's own validation of the reply


def test_the_server_holds_replies_to_the_schema(tiny_qwen2_dir):
    """The tiny random model rarely finishes within the budget; what it says is a prefix the schema allows."""
    openai = pytest.importorskip("openai")
    from engine.serving.loop import EngineLoop
    from tests.helpers import make_engine
    from tests.serve_helpers import app_server

    engine = make_engine(tiny_qwen2_dir, batch=2, max_context=512)
    engine.tokenizer.eos_ids = {engine.tokenizer.token_to_id("<|im_end|>")}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"]}
    with app_server(EngineLoop(lambda: engine).start()) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        texts = [client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "JSON"}], max_tokens=40, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
        ).choices[0].message.content for seed in range(3)]
        with pytest.raises(openai.BadRequestError, match="'pattern' is not supported"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], response_format={
                "type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "string", "pattern": "a"}}})
    node = compile_schema(schema)
    for text in texts:
        whole, done = accepts(node, text)
        assert whole, repr(text)
        if done:
            assert set(json.loads(text)) == {"ok", "n"}
