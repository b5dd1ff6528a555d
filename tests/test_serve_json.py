"""JSON mode (response_format json_object): the recogniser against Python's json module, the constrained draw,
and replies of the tiny random model and of the real SmolLM2 held to one JSON object."""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine.serving import json_mode
from engine.sampling import SamplingParams as TokenParams
from engine.serving.constrain import Format, JsonValue, constrained_token
from engine.serving.params import SamplingParams


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "lit"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([0.0, -1.5, 3.25e-7, 1e300, -2.5e-300])
    if kind == "str":
        return "".join(rng.choice('ab "\\/\n\t\u00e9\u4e2d\U0001f600\x01') for _ in range(rng.randint(0, 6)))
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return _random_dict(rng, depth + 1)


def _random_dict(rng: random.Random, depth: int = 0) -> dict:
    return {"".join(rng.choice("k\"é") for _ in range(rng.randint(0, 3))): _random_value(rng, depth)
            for _ in range(rng.randint(0, 3))}


@pytest.mark.parametrize("seed", range(4))
def test_every_prefix_of_a_json_object_is_accepted_and_the_whole_one_closes(seed):
    rng = random.Random(seed)
    for _ in range(50):
        text = json.dumps(_random_dict(rng), indent=rng.choice([None, 1, 4]), ensure_ascii=rng.random() < 0.5)
        state = json_mode.START
        for ch in text:
            state = json_mode.step(state, ch)
            assert state is not None, text
            assert not json_mode.done(state) or text.endswith(ch)
        assert json_mode.done(state), text


@pytest.mark.parametrize("text", ['[1]', '"x"', '1', '{"a":}', '{"a" 1}', '{"a":01}', '{"a":1,}', '{,}', '{"a":tru}',
                                  '{"a":"\x01"}', '{"a":1}}', '{"a":1.}', '{"a":-}', '{"a":"\\x"}', '{"a":[1,]}',
                                  '{"a":1} ', '{"a":.5}', '{"a":NaN}', '{"a":"\\u12G4"}', "{" + " " * 65 + "}"])
def test_what_is_not_a_json_object_is_refused(text):
    state = json_mode.feed(json_mode.START, text)
    assert state is None or not json_mode.done(state)


def test_the_recogniser_agrees_with_the_json_module_on_random_text():
    rng, alphabet, closed = random.Random(0), '{}[]":,0123456789.-+eEtrufalsn\\ ab\n', 0
    for _ in range(100000):
        text = "{" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        state = json_mode.feed(json_mode.START, text)
        try:
            is_object = isinstance(json.loads(text), dict) and text == text.rstrip()
        except ValueError:
            is_object = False
        assert (state is not None and json_mode.done(state)) == is_object, text
        closed += is_object
    assert closed > 100  # the alphabet makes whole objects often enough to mean something


class _Tokens:
    """A tokenizer of fixed token texts ("" for a special token)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.texts[i] for i in ids)


TEXTS = ["{", "}", '"a"', ":", "1", "hello", "", " ", "<eos>"]
EOS = {8}


def _take(c: Format, row: list[float], temperature: float = 0.0, seed: int = 0, **filters) -> int:
    logits = torch.tensor(row)
    drawn = int(logits.argmax())
    token = constrained_token(logits, drawn, c, EOS, TokenParams(temperature=temperature, **filters),
                              torch.Generator().manual_seed(seed))
    c.advance(token, EOS)
    return token


def test_the_draw_falls_back_to_the_most_likely_allowed_token():
    c = Format(_Tokens(TEXTS), [JsonValue()])
    assert _take(c, [0, 9, 0, 0, 0, 0, 0, 0, 9]) == 0  # "}" and eos cannot open the reply: "{"
    assert _take(c, [0, 1, 0, 0, 0, 9, 8, 0, 7]) == 1  # hello, the special token and eos refused: "}"
    assert c.closed
    assert _take(c, [9, 9, 9, 9, 9, 9, 9, 9, 0]) == 8  # closed: only the end


def test_a_sampled_fallback_draws_only_allowed_tokens():
    for seed in range(20):
        c = Format(_Tokens(TEXTS), [JsonValue()])
        _take(c, [5, 0, 0, 0, 0, 0, 0, 0, 0])
        token = _take(c, [0, 1, 1, 0, 0, 9, 0, 1, 0], temperature=1.0, seed=seed)
        assert token in (1, 2, 7)  # "}", '"a"' or " " after "{"


@pytest.mark.parametrize("filters,kept", [(dict(top_k=1), {2}), (dict(top_k=2), {2, 1}), (dict(top_p=0.4), {2}),
                                          (dict(top_p=0.6), {2, 1}), (dict(min_p=0.5), {2, 1}), (dict(), {1, 2, 7})])
def test_the_fallback_draw_applies_the_row_s_top_k_top_p_and_min_p(filters, kept):
    """Among the allowed tokens ("}" 1.9, '"a"' 2.0, " " 0.5 after "{": probabilities 0.425, 0.47, 0.105; "hello"
    9 refused): top-k 1 or top-p 0.4 keeps the likeliest, top-k 2, top-p 0.6 and min-p 0.5 the two close ones;
    unfiltered, all three come up."""
    seen = set()
    for seed in range(60):
        c = Format(_Tokens(TEXTS), [JsonValue()])
        _take(c, [5, 0, 0, 0, 0, 0, 0, 0, 0])
        seen.add(_take(c, [0, 1.9, 2.0, 0, 0, 9, 0, 0.5, 0], temperature=1.0, seed=seed, **filters))
    assert seen == kept


def test_json_object_and_ignore_eos_do_not_combine():
    with pytest.raises(ValueError, match="leave ignore_eos off"):
        SamplingParams(json_object=True, ignore_eos=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_tiny_models_replies_stay_inside_one_json_object(tiny_qwen2_dir, temperature):
    from engine import LLM

    with LLM(tiny_qwen2_dir, device="cpu", dtype="fp32", kernels="torch", max_batch=4, max_context=512) as llm:
        outs = llm.chat([[{"role": "user", "content": f"JSON please {i}"}] for i in range(4)],
                        SamplingParams(max_tokens=200, temperature=temperature, seed=1, json_object=True),
                        use_tqdm=False)
    for o in (r.outputs[0] for r in outs):
        state = json_mode.feed(json_mode.START, o.text)
        assert state is not None, o.text
        if o.finish_reason == "stop":
            assert json_mode.done(state) and isinstance(json.loads(o.text), dict)


def test_the_real_model_answers_with_one_json_object(smollm2, one_torch_thread):
    from engine import LLM

    question = [{"role": "user", "content": "Give the name and age of a person called Alice who is 30, as JSON."}]
    with LLM(smollm2, device="cpu", dtype="fp32", kernels="torch", max_batch=1, max_context=512) as llm:
        free = llm.chat(question, SamplingParams(max_tokens=80), use_tqdm=False)[0].outputs[0]
        held = llm.chat(question, SamplingParams(max_tokens=80, json_object=True), use_tqdm=False)[0].outputs[0]
    assert held.finish_reason == "stop", held.text
    assert isinstance(json.loads(held.text), dict), held.text
    assert free.text != held.text  # unconstrained, the model wraps its answer in prose or a code fence


def test_with_no_allowed_token_and_no_end_the_draw_is_kept_and_nothing_fails():
    """A vocabulary that cannot continue the object and a model without an end-of-sequence token: the drawn
    token is taken (the reply leaves the format) instead of an error in the engine's step."""
    c = Format(_Tokens(["x", "y"]), [JsonValue()])
    logits = torch.tensor([1.0, 0.0])
    token = constrained_token(logits, 0, c, set(), TokenParams(), None)
    c.advance(token, set())
    assert token == 0 and c.state == (0, json_mode.START)
