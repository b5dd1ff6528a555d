"""Served passes with a stacked unit's prompt slices in one launch each (engine/varlen.py) against the same requests
with the path off: the scheduler on the slot cache, the Triton kernels in the interpreter, prompts arriving while
others decode (a decode group and prompt slices in one pass), the prompt states on the device and in host memory.
Greedy outputs are equal and at least one pass laid out a plan."""
from __future__ import annotations

import pytest
import torch

from tests.kernel_utils import DEV  # noqa: F401  (sets TRITON_INTERPRET first)

import engine.model  # noqa: E402
from engine.footprint import min_budget  # noqa: E402
from engine.serving.params import SamplingParams  # noqa: E402
from engine.serving.scheduler import Scheduler  # noqa: E402
from engine.serving.sequence import Sequence  # noqa: E402
from tests.helpers import make_engine, random_prompts  # noqa: E402


def _serve(eng, prompts: list[list[int]], late: list[list[int]], max_tokens: int = 4,
           kv_cache: str = "slots") -> list[list[int]]:
    """Every prompt's greedy tokens; ``late`` ones join after the first step."""
    sched = Scheduler(eng, kv_cache=kv_cache)
    seqs = [Sequence(p, SamplingParams(max_tokens=max_tokens), eng.tokenizer) for p in prompts]
    lates = [Sequence(p, SamplingParams(max_tokens=max_tokens), eng.tokenizer) for p in late]
    for s in seqs:
        sched.add(s)
    steps = 0
    while not all(s.finished for s in seqs + lates):
        if steps == 1:
            for s in lates:
                sched.add(s)
        sched.step()
        steps += 1
    return [s.output_ids for s in seqs + lates]


@pytest.mark.parametrize("states", ["vram", "host", "paged"])
def test_served_outputs_equal_with_the_path_off(tiny_qwen2_dir, monkeypatch, states):
    """paged: the paged cache's groups bring their own keys and values, so no pass lays out a plan."""
    kv_cache = "paged" if states == "paged" else "slots"
    states = "vram" if states == "paged" else states
    monkeypatch.setattr("engine.state_parking.MIN_SPAN_ELEMENTS", 1)  # the tiny model's tails are short
    kw = dict(batch=6, max_context=128, prefill_chunk=48, kernels="triton", device=DEV, prefill_states=states)
    single = make_engine(tiny_qwen2_dir, batch=1, max_context=128)
    budget = min_budget(single.cfg, torch.float32, batch=6, max_context=128, prefill_chunk=48)
    single.close()
    plans = []
    real = engine.model.plan_unit
    monkeypatch.setattr(engine.model, "plan_unit", lambda *a: plans.append(real(*a)) or plans[-1])
    prompts = random_prompts([30, 30, 20, 7], 1000, seed=42)
    late = random_prompts([9, 25], 1000, seed=43)
    outs = []
    for on in ("0", "1"):
        monkeypatch.setenv("LAYERSTREAM_VARLEN_PREFILL", on)
        eng = make_engine(tiny_qwen2_dir, vram_budget=budget, **kw)
        try:
            outs.append(_serve(eng, prompts, late, kv_cache=kv_cache))
        finally:
            eng.close()
    if kv_cache == "paged":
        assert not any(p is not None for p in plans)
    else:
        assert any(p is not None for p in plans), "no pass stacked two prompt slices"
    assert outs[0] == outs[1]
