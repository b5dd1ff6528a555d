"""A served pass's decode group through the decode step's graphs (engine/graph_unit.py).

On the CPU: where each of the decode graph's steps is replayed in a pass (``due_steps``), for the real schedule
(``DecodeGraph._schedule``) of resident and streamed layers in every arrangement: every layer once, in order, a
streamed layer at its own layer, a resident one no later than its own. Then the scheduler on a tiny engine whose
decode graph re-runs its Python on replay (tests.helpers.CpuDecodeGraph), all resident and streamed: requests
arriving while others decode get the tokens they get alone, with the unit and without. On CUDA
(tests/test_gpu_graph_unit.py) the same with real graphs.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from engine.graph_unit import due_steps
from engine.graphs import DecodeGraph
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from engine.footprint import min_budget
from tests.helpers import CpuDecodeGraph, make_engine, random_prompts
from tests.sched_helpers import alone, run_all


def _graph(resident: set[int], n: int, head_in_graph: bool) -> DecodeGraph:
    """A DecodeGraph's schedule without CUDA: each fixed piece's callables name their layers."""
    g = object.__new__(DecodeGraph)
    g.model = SimpleNamespace(host=None, cfg=SimpleNamespace(num_hidden_layers=n))
    g.weights = SimpleNamespace(resident={i: None for i in resident})
    g.head_in_graph = head_in_graph
    g._start = "start"
    g._head = "head"
    g._layers_fn = lambda layers, weights_of=None: layers
    g.steps = [(k, w if k == "fixed" else (w, None)) for k, w in g._schedule()]
    return g


def _arrangements(n: int):
    for bits in itertools.product([0, 1], repeat=n):
        yield {i for i, b in enumerate(bits) if b}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("head_in_graph", [False, True])
def test_every_layer_replayed_once_in_order_and_never_late(n, head_in_graph):
    for resident in _arrangements(n):
        g = _graph(resident, n, head_in_graph)
        due = due_steps(g)
        ran, started = [], False
        for i in range(n):
            for kind, what in due.get(i, ()):
                if kind == "streamed":
                    assert what[0] == i and i not in resident
                    ran.append(i)
                    continue
                for piece in what:
                    if piece == "start":
                        assert not ran, "the step's start after a layer"
                        started = True
                    elif piece != "head":
                        assert all(j >= i for j in piece), f"{resident}: layers {piece} replayed at {i}"
                        ran += list(piece)
        assert started and ran == list(range(n)), (resident, ran)


def test_a_last_head_only_piece_is_left_out():
    g = _graph({0}, 2, head_in_graph=True)  # layer 1 streamed: the head's piece alone after it
    assert g.steps[-1] == ("fixed", ["head"])
    placed = [step for steps in due_steps(g).values() for step in steps]
    assert ("fixed", ["head"]) not in placed


def _engine(model_dir, tier: str):
    kw = dict(batch=4, max_context=64, prefill_chunk=32)
    if tier == "streamed":  # one layer more than the least: the rest streams from pinned host memory
        probe = make_engine(model_dir, **kw)
        kw["vram_budget"] = min_budget(probe.cfg, torch.float32, **kw) + probe.plan.layer_bytes
        probe.close()
    eng = make_engine(model_dir, **kw)
    eng.graph = CpuDecodeGraph(eng.model, eng.cache, 4)
    return eng


@pytest.mark.parametrize("tier", ["resident", "streamed"])
def test_decoding_rows_by_the_graph_beside_prompts_keep_every_token(tiny_qwen2_dir, tier):
    single = make_engine(tiny_qwen2_dir, batch=1, max_context=64)
    prompts = random_prompts([9, 3, 20, 5, 1, 14], single.cfg.vocab_size, seed=11)
    want = [alone(single, p, 7) for p in prompts]
    single.close()
    eng = _engine(tiny_qwen2_dir, tier)
    try:
        if tier == "streamed":
            assert eng.plan.streamed_layers and eng.plan.resident_layers
        for unit in (True, False):
            sched = Scheduler(eng)
            sched.runner.graph_unit = unit
            seqs = [Sequence(p, SamplingParams(max_tokens=7), eng.tokenizer) for p in prompts]
            run_all(sched, seqs, {i: 2 * i for i in range(len(seqs))})  # each joins the decoding ones
            assert [s.output_ids for s in seqs] == want, f"graph unit {unit}"
            assert (sched.runner.graph_unit_passes > 0) == unit
    finally:
        eng.close()


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), (" off", False)])
def test_the_unit_is_on_unless_turned_off(tiny_qwen2_dir, monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("LAYERSTREAM_GRAPH_UNIT", raising=False)
    else:
        monkeypatch.setenv("LAYERSTREAM_GRAPH_UNIT", value)
    eng = make_engine(tiny_qwen2_dir, batch=2)
    try:
        assert Scheduler(eng).runner.graph_unit is on
    finally:
        eng.close()
