"""The Python API: ``from engine import LLM, SamplingParams`` over the serving scheduler (CPU, fp32)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine import LLM, SamplingParams
from engine.engine import Engine, EngineOptions
from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from tests.helpers import random_prompts
from tests.serve_helpers import ROOT

OPTS = dict(device="cpu", dtype="fp32", kernels="torch", max_context=128)


@pytest.fixture(scope="module")
def llm(tiny_qwen2_dir):
    with LLM(tiny_qwen2_dir, max_batch=3, prefill_chunk=32, **OPTS) as m:
        yield m


@pytest.fixture(scope="module")
def alone(tiny_qwen2_dir):
    engine = Engine(tiny_qwen2_dir, EngineOptions(**OPTS))
    yield lambda ids, n: generate(engine, [ids], TokenParams(), max_new_tokens=n)
    engine.close()


def test_generate_matches_each_prompt_alone(llm, alone):
    prompts = random_prompts([3, 40, 9, 1, 22], llm.engine.cfg.vocab_size, seed=2)  # 5 prompts, 3 slots
    outs = llm.generate(prompts, SamplingParams(max_tokens=7), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, o in zip(prompts, outs):
        ref = alone(p, 7)
        (c,) = o.outputs
        assert c.token_ids == ref.token_ids[0]
        assert c.finish_reason == {"max_new_tokens": "length", "eos": "stop"}[ref.finish_reasons[0]]
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_an_error_mid_call_leaves_the_llm_usable(llm, alone, monkeypatch):
    """A pass that fails (out of memory on a GPU) aborts that call's sequences: the next call starts clean."""
    prompts = random_prompts([5, 30, 12], llm.engine.cfg.vocab_size, seed=4)
    runner, real = llm.scheduler.runner, llm.scheduler.runner.step
    calls = []

    def failing(seqs):
        calls.append(len(seqs))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(seqs)

    monkeypatch.setattr(runner, "step", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.scheduler.has_work() and len(llm.scheduler.free_slots) == 3
    outs = llm.generate(prompts, SamplingParams(max_tokens=4), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [alone(p, 4).token_ids[0] for p in prompts]


def test_text_prompts_and_chat(llm, alone, capsys):
    (out,) = llm.generate("hello world", SamplingParams(max_tokens=5), use_tqdm=False)
    assert out.prompt == "hello world" and out.outputs[0].token_ids == alone(llm.tokenizer.encode("hello world"),
                                                                               5).token_ids[0]
    convs = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be brief"},
                                                    {"role": "user", "content": "why?"}]]
    outs = llm.chat(convs, SamplingParams(max_tokens=4))
    assert "generating" in capsys.readouterr().err  # the progress bar
    for conv, o in zip(convs, outs):
        ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(conv), add_special_tokens=False)
        assert o.prompt_token_ids == ids and o.outputs[0].token_ids == alone(ids, 4).token_ids[0]


def test_logprobs(llm):
    (out,) = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, logprobs=2, ignore_eos=True), use_tqdm=False)
    c = out.outputs[0]
    assert [e.token_id for e in c.logprobs] == c.token_ids  # greedy: each token is the top alternative
    assert all(e.top[0] == (e.token_id, pytest.approx(e.logprob)) and len(e.top) == 2 for e in c.logprobs)
    assert llm.generate([[5]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].logprobs is None


def test_n_with_seed_and_per_prompt_params(llm):
    p = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=6, ignore_eos=True)
    a, b = llm.generate([[1, 2, 3], [1, 2, 3]], [p, p], use_tqdm=False)
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]  # same seed, same draws
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # completion i draws with seed + i


def test_bad_input_fails_before_any_work(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[1]], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="context holds 128 tokens"):
        llm.generate([[1, 2], [1] * 120], SamplingParams(max_tokens=20), use_tqdm=False)


@pytest.mark.parametrize("call,args,error,match", [
    ("generate", (None,), TypeError,
     "prompts must be a string, a list of token ids, or a list of either .*got NoneType"),
    ("generate", (5,), TypeError, "got int"),
    ("generate", ([[1, 2], [True]],), TypeError, "got list holding other types"),
    ("generate", ([1.5],), TypeError, "got list holding other types"),
    ("generate", ("hi", {"max_tokens": 2}), TypeError, r"params must be engine\.SamplingParams .*got dict"),
    ("generate", ("a\ud800",), ValueError, "not valid Unicode: character 1 is an unpaired surrogate"),
    ("chat", ("hello",), TypeError, "conversations must be a list of messages like .*got str"),
    ("chat", ([{"content": "no role"}],), TypeError, "conversations must be"),
])
def test_wrong_types_say_what_is_accepted(llm, call, args, error, match):
    with pytest.raises(error, match=match):
        getattr(llm, call)(*args, use_tqdm=False)


def test_empty_batches_give_empty_results(llm, capsys):
    assert llm.generate([]) == [] and llm.chat([]) == []
    assert "generating" not in capsys.readouterr().err  # no progress bar for nothing


def test_engine_package_imports_lazily():
    code = ("import sys, engine; assert 'engine.llm' not in sys.modules and 'torch' not in sys.modules; "
            "from engine import LLM, SamplingParams; assert LLM.__module__ == 'engine.llm'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_paged_cache_reuses_prompt_prefixes_across_calls(tiny_qwen2_dir, alone):
    system = [{"role": "system", "content": "You are a helpful assistant who answers in one short line. " * 3}]
    with LLM(tiny_qwen2_dir, max_batch=2, kv_cache="paged", block_size=8, **OPTS) as llm:
        first = llm.chat(system + [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5), use_tqdm=False)
        assert llm.scheduler.stats.cached_prompt_tokens == 0
        second = llm.chat(system + [{"role": "user", "content": "bye"}], SamplingParams(max_tokens=5), use_tqdm=False)
        hits = llm.scheduler.stats.cached_prompt_tokens
        assert hits >= 8 and hits % 8 == 0
        for out in first + second:
            assert out.outputs[0].token_ids == alone(out.prompt_token_ids, 5).token_ids[0]


def _cut_at(ids: list[int], stops: set[int]) -> list[int]:
    """``ids`` up to (not including) the first of ``stops``."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def test_stop_token_ids_end_the_reply_without_the_token(llm):
    """vLLM's ``stop_token_ids``: the first one sampled ends the reply ("stop", left out as eos is), even with
    ``ignore_eos``; one past the vocabulary, or not a token id, is a ValueError naming the field."""
    prompts = random_prompts([3, 9], llm.engine.cfg.vocab_size, seed=2)
    free = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token first sampled at step k >= 2
    stops = {ids[k], 5}
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, stop_token_ids=sorted(stops)),
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == ids[:k] and outs[0].outputs[0].finish_reason == "stop"
    for f, o in zip(free, outs):
        (c,) = o.outputs
        want = _cut_at(f.outputs[0].token_ids, stops)
        assert c.token_ids == want and c.finish_reason == ("stop" if len(want) < 8 else "length")
        assert c.text == llm.tokenizer.decode(want, skip_special_tokens=True)
    vocab = llm.engine.cfg.vocab_size
    with pytest.raises(ValueError, match=f"stop_token_ids names token {vocab}, past this model's vocabulary"):
        llm.generate([[1, 2]], SamplingParams(stop_token_ids=[3, vocab]), use_tqdm=False)
    for bad in ([-1], ["3"], [True], 3):
        with pytest.raises(ValueError, match="stop_token_ids must be a list of token ids"):
            SamplingParams(stop_token_ids=bad)
