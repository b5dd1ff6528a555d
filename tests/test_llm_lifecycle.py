"""The Python API's lifecycle (CPU, fp32): calls from several threads, a constructor that fails, close(), and errors
that name the prompt."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from engine import LLM, SamplingParams
from tests.helpers import random_prompts

OPTS = dict(device="cpu", dtype="fp32", kernels="torch", max_context=128)


def test_calls_from_two_threads_each_get_their_own_results(tiny_qwen2_dir):
    """Two threads on one LLM: each call gets exactly what it gets alone (they stepped each other's sequences and
    both failed: one batch runs at a time now)."""
    with LLM(tiny_qwen2_dir, max_batch=2, prefill_chunk=32, **OPTS) as llm:
        vocab = llm.engine.cfg.vocab_size
        batches = [random_prompts([5, 17, 9], vocab, seed=s) for s in (1, 2)]
        params = SamplingParams(max_tokens=12, ignore_eos=True)
        want = [[o.outputs[0].token_ids for o in llm.generate(b, params, use_tqdm=False)] for b in batches]
        got, errors = [None, None], []

        def run(k: int) -> None:
            try:
                got[k] = [o.outputs[0].token_ids for o in llm.generate(batches[k], params, use_tqdm=False)]
            except BaseException as e:  # noqa: BLE001 -- reported below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors and got == want


def test_a_bad_cache_option_fails_before_the_load(tiny_qwen2_dir, monkeypatch):
    import engine.cli_session as session

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(session, "load_engine", no_load)
    for kv, block in (("Paged", 16), ("paged", 0)):
        with pytest.raises(ValueError, match="kv_cache must be 'slots' or 'paged'"):
            LLM(tiny_qwen2_dir, kv_cache=kv, block_size=block, **OPTS)


def test_close_frees_the_engine_at_once_and_later_calls_say_so(tiny_qwen2_dir):
    """close() broke no reference cycle: the engine and its KV cache lived until a garbage collection."""
    llm = LLM(tiny_qwen2_dir, **OPTS)
    llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)
    gc.disable()
    try:
        engine = weakref.ref(llm.engine)
        llm.close()
        llm.close()  # idempotent
        with pytest.raises(RuntimeError, match="this LLM is closed"):
            llm.generate("hi", use_tqdm=False)
        del llm
        assert engine() is None
    finally:
        gc.enable()


def test_errors_name_the_prompt_and_stop_none_is_no_stop(tiny_qwen2_dir):
    with LLM(tiny_qwen2_dir, **OPTS) as llm:
        with pytest.raises(ValueError, match=r"prompt 1: this model's context holds 128 tokens"):
            llm.generate([[1, 2], [1] * 120, [3]], SamplingParams(max_tokens=20), use_tqdm=False)
        with pytest.raises(ValueError, match="prompt 2: empty prompt"):
            llm.generate([[1], [2], []], use_tqdm=False)
        assert SamplingParams(stop=None).stop == ()
