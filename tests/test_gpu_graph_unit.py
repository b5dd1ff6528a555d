"""GPU-only: a served pass's decoding rows through the decode step's graphs (engine/graph_unit.py).

A model with resident and streamed layers on the slot cache: requests arriving one by one join the decoding
ones, so prompt passes run beside decoding rows; with the graph unit (the default) and without
(``LAYERSTREAM_GRAPH_UNIT=0``), every request gets the tokens it gets alone, and the unit really ran (in passes
whose prompts are short enough that the lm_head is not lent free rows): the graphs' padding key at a prompt row's
next position is written over by that prompt, and a free row's at position 0 by the next prompt admitted there.
"""

from __future__ import annotations

import gc

import pytest
import torch

from engine.engine import Engine, EngineOptions
from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import random_prompts

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from engine.synth.writer import synthesize
    out = tmp_path_factory.mktemp("q05u") / "qwen2.5-0.5b"
    synthesize("qwen2.5-0.5b", out, dtype="bf16", seed=3, layers=6, device="cuda")
    return out


def _engine(model_dir, batch: int, budget: int | None) -> Engine:
    engine = Engine(model_dir, EngineOptions(device="cuda", dtype="fp32", batch=batch, max_context=160,
                                             prefill_chunk=48, vram_budget=budget))
    engine.tokenizer.eos_ids = set()  # fixed-length streams
    return engine


def _free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)


def _serve(engine: Engine, prompts: list[list[int]], unit: bool) -> tuple[list[list[int]], int]:
    sched = Scheduler(engine, kv_cache="slots")
    sched.runner.graph_unit = unit
    seqs = [Sequence(p, SamplingParams(max_tokens=10), engine.tokenizer) for p in prompts]
    for step in range(600):
        for i, s in enumerate(seqs):
            if step == 3 * i:  # staggered: each joins the decoding ones
                sched.add(s)
        sched.step()
        if all(s.finished for s in seqs):
            break
    return [s.output_ids for s in seqs], sched.runner.graph_unit_passes


def test_decoding_rows_by_graphs_beside_prompts_keep_every_token(small_model):
    from memory.process_vram import outside_allocator
    _free()
    full = _engine(small_model, 1, None)
    try:
        half = outside_allocator(torch.device("cuda", 0)).bytes + full.plan.total_bytes // 2
        prompts = random_prompts([30, 5, 70, 12, 1, 41], full.cfg.vocab_size, seed=7)
        alone = [generate(full, [p], TokenParams(), max_new_tokens=10).token_ids[0] for p in prompts]
    finally:
        full.close()
        del full
        _free()
    engine = _engine(small_model, 4, half)
    try:
        assert engine.plan.streamed_layers and engine.plan.resident_layers, "the test needs both kinds of layers"
        assert engine.graph is not None, "the decode graph should be captured on CUDA"
        with_unit, used = _serve(engine, prompts, True)
        without, unused = _serve(engine, prompts, False)
        assert used > 0 and unused == 0
        assert with_unit == alone
        assert without == alone
    finally:
        engine.close()
        del engine
        _free()
