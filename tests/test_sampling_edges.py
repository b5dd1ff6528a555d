"""Sampling edge cases a user notices (CPU): a temperature too small to divide by is greedy; a format's fallback draw
sees the repetition penalty the sampler saw; a prompt's seeded text does not depend on its place in a request's
list of prompts."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from engine.sampling import Sampler, SamplingParams as TokenParams


@pytest.mark.parametrize("temperature", [1e-40, 1e-38, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature):
    """Dividing the logits by 1e-38 overflowed them, and the draw then took token 0."""
    logits = torch.tensor([[-5.0, 1.0, 30.0, 2.0]])
    sampler = Sampler(TokenParams(temperature=temperature, seed=1), 4, torch.device("cpu"))
    assert sampler.params.greedy and [int(sampler(logits)) for _ in range(5)] == [2] * 5


def test_a_formats_fallback_draw_sees_the_repetition_penalty():
    """JSON mode, greedy, repetition penalty 2 with "}" generated before: the most likely token ("hello") is not
    allowed, and the fallback took "}" (logit 5) over '"a"' (4.9) from unpenalised logits; penalised, "}" is 2.5."""
    from engine.serving.constrain import Format, JsonValue
    from engine.serving.params import SamplingParams
    from engine.serving.rows import RowSampler

    texts = ["{", "}", '"a"', ":", "1", "hello", "", " ", "<eos>"]

    class Tok:  # a vocabulary of whole texts
        eos_ids = {8}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(texts[i] for i in ids)
    tok = Tok()
    eng = NS(cfg=NS(vocab_size=len(texts)), device=torch.device("cpu"), ops=NS(name="torch"), tokenizer=tok)
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, json_object=True)
    fmt = Format(tok, [JsonValue()])
    fmt.advance(0, {8})  # the reply so far: "{"
    seq = NS(params=params, token_params=params.token_params(0), prompt_ids=[1], output_ids=[0], all_ids=[1, 0],
             constraint=fmt, sampler=None, slot=0, seq_id=1)
    row = torch.tensor([[0, 5.0, 4.9, 0, 0, 9, 0, 0, 0]])
    assert texts[RowSampler(eng)._sample_one(row, seq)] == '"a"'


def test_a_prompts_seeded_text_does_not_depend_on_its_place_in_the_list(tiny_qwen2_dir):
    """/v1/completions with prompts ["A", "B"] and seed 5: B's text is B's alone with seed 5 (it was seeded 5 + its
    place, as LLM.generate never did); its n choices still differ."""
    openai = pytest.importorskip("openai")
    from engine.serving.loop import EngineLoop
    from tests.helpers import make_engine
    from tests.serve_helpers import app_server

    engine = make_engine(tiny_qwen2_dir, batch=4, max_context=256)
    with app_server(EngineLoop(lambda: engine).start()) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        ask = dict(model="m", max_tokens=8, temperature=1.0, seed=5)
        both = client.completions.create(prompt=["A short one", "Another prompt"], n=2, **ask).choices
        alone = client.completions.create(prompt="Another prompt", n=2, **ask).choices
    texts = {c.index: c.text for c in both}
    assert [texts[2], texts[3]] == [c.text for c in sorted(alone, key=lambda c: c.index)]
    assert texts[2] != texts[3]
