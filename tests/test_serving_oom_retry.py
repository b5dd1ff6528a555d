"""A served pass that runs out of device memory runs once more with half the stacked rows (engine/serving/
retry.py), and every request still gets the tokens it gets alone; a second failure reaches
the server as before. CPU, tiny model: an op raises torch's OutOfMemoryError partway through a prompt's pass, after
earlier layers wrote their keys and values."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.serving.params import SamplingParams
from engine.serving.sequence import Sequence
from tests.helpers import random_prompts
from tests.sched_helpers import alone, engines, run_all, scheduler_for  # noqa: F401  (engines: a fixture)


def _failing(ops, monkeypatch, failures: int, decode: bool = False):
    """ops.swiglu_linear raising OutOfMemoryError on its 2nd call of a prompt pass (``decode``: on every call of
    a decode step), ``failures`` times."""
    real, calls, left = ops.swiglu_linear, [], [failures]

    def swiglu_linear(gate_up, w):
        if (gate_up.numel() // gate_up.shape[-1] > 4) != decode:  # a prompt's rows, or a decode step's
            calls.append(1)
            if left[0] and (decode or len(calls) % 2 == 0):
                left[0] -= 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 220.00 MiB")
        return real(gate_up, w)
    monkeypatch.setattr(ops, "swiglu_linear", swiglu_linear)


def _each_as_alone(single, prompts, seqs, n: int, fresh=None) -> None:
    """Every sequence's tokens equal its prompt's alone; ``fresh``: the paged case's own engine, closed after."""
    for p, s in zip(prompts, seqs):
        assert s.output_ids == alone(single, p, n)
    if fresh is not None:
        fresh.close()


@pytest.mark.parametrize("one", [0, 64])
@pytest.mark.parametrize("kv", ["slots", "paged-16"])
def test_a_pass_out_of_memory_runs_again_with_smaller_stacks(tiny_qwen2_dir, engines, monkeypatch, caplog, kv, one):
    """``one``: a pass whose prompt rows fit one unit (``runner.one_unit``, LAYERSTREAM_STACK_PIECES=1) runs them as
    one; out of memory, it runs again in half-chunk units (not one unit again), the one-unit rows back after."""
    single, multi = engines
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    eng = sched.engine
    monkeypatch.setattr(sched.runner, "one_unit", one)
    if one:
        monkeypatch.setattr(eng.ops, "mlp_budget", None)  # the MLP whole: the failing op is its SwiGLU + down
    stacks, lends = [], []
    real = eng.model.forward_groups
    monkeypatch.setattr(eng.model, "forward_groups", lambda *a, **k: stacks.append(k.get("stack_rows")) or
                        lends.append(eng.model.lend_head) or real(*a, **k))
    _failing(eng.model.ops, monkeypatch, failures=1)
    prompts = random_prompts([9, 13, 5], eng.cfg.vocab_size, seed=12)
    seqs = [Sequence(p, SamplingParams(max_tokens=5), eng.tokenizer) for p in prompts]
    with caplog.at_level(logging.WARNING, logger="engine.serving.retry"):
        run_all(sched, seqs)
    assert stacks[:2] == [one or 16, 8] and "ran out of device memory" in caplog.text  # 27 prompt rows: one unit
    assert lends[:2] == [True, False]  # the retry lends the streamer no memory (engine.head_ahead)
    assert sched.runner.stack_rows == 16 and sched.runner.one_unit == one and eng.model.lend_head  # restored
    _each_as_alone(single, prompts, seqs, 5, eng if kv != "slots" else None)


def test_a_second_failure_reaches_the_caller(tiny_qwen2_dir, engines, monkeypatch):
    _, multi = engines
    sched = scheduler_for("slots", tiny_qwen2_dir, multi)
    _failing(multi.model.ops, monkeypatch, failures=2)
    sched.add(Sequence(random_prompts([11], multi.cfg.vocab_size, seed=2)[0], SamplingParams(max_tokens=3),
                       multi.tokenizer))
    with pytest.raises(torch.OutOfMemoryError):
        sched.step()
    assert sched.runner.stack_rows == 16 and all(s.num_computed == 0 for s in sched.running)


@pytest.mark.parametrize("kv", ["slots", "paged-16"])
def test_a_decode_step_out_of_memory_runs_again(tiny_qwen2_dir, engines, monkeypatch, caplog, kv):
    single, multi = engines
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    eng = sched.engine
    prompts = random_prompts([7, 10], eng.cfg.vocab_size, seed=31)
    seqs = [Sequence(p, SamplingParams(max_tokens=4), eng.tokenizer) for p in prompts]
    for s in seqs:
        sched.add(s)
    sched.step()  # the prompts' pass: every sequence has its first token and decodes next
    assert all(s.pending == 1 for s in seqs)
    _failing(eng.model.ops, monkeypatch, failures=1, decode=True)
    with caplog.at_level(logging.WARNING, logger="engine.serving.retry"):
        while not all(s.finished for s in seqs):
            sched.step()
    assert "a decode step of 2 sequences ran out of device memory" in caplog.text
    _each_as_alone(single, prompts, seqs, 4, eng if kv != "slots" else None)


def test_a_second_decode_failure_reaches_the_caller(tiny_qwen2_dir, engines, monkeypatch):
    _, multi = engines
    sched = scheduler_for("slots", tiny_qwen2_dir, multi)
    s = Sequence(random_prompts([6], multi.cfg.vocab_size, seed=5)[0], SamplingParams(max_tokens=3), multi.tokenizer)
    sched.add(s)
    sched.step()
    _failing(multi.model.ops, monkeypatch, failures=2, decode=True)
    with pytest.raises(torch.OutOfMemoryError):
        sched.step()
    assert s.num_computed == 6 and len(s.output_ids) == 1  # nothing advanced
