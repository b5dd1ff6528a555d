"""A served pass's prompt slices fill the stacks they share (engine/serving/packing.stack_slices): a prompt goes on
in the next stack instead of starting a stack of its own, so a pass has about as few units (each widening and
launching every projection of every layer) as its rows need, and every request still gets its tokens alone."""

from __future__ import annotations

import random

import pytest

import engine.model
from engine.serving.packing import MIN_CUT, stack_slices
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts
from tests.sched_helpers import alone


def _units(slices: list[tuple], stack_rows: int) -> list[int]:
    """The rows of each unit engine.stacking's in-order runs make of these slices (one group each)."""
    runs: list[int] = []
    total = stack_rows + 1
    for _, _, n in slices:
        if n > 1 and total + n <= stack_rows:
            runs[-1] += n
            total += n
        else:
            runs.append(n)
            total = n if n > 1 else stack_rows + 1
    return runs


def test_the_burst_of_16_clients_fills_its_stacks():
    """The 16-client burst's first pass (the 9 shortest prompts) in 4 units of 2,048 rows at most, not 5."""
    lengths = [132, 306, 567, 639, 681, 913, 947, 1117, 1345]
    slices = stack_slices([(i, 0, n) for i, n in enumerate(lengths)], 2048, 2048)
    assert _units(slices, 2048) == [2048, 2048, 2048, 503]
    assert _units([(i, 0, n) for i, n in enumerate(lengths)], 2048) == [1644, 1594, 947, 1117, 1345]


def _old_order(prompts: list[tuple], chunk: int) -> list[tuple]:
    """The runner's slices before they fill stacks: every prompt's whole chunks, then every prompt's last slice."""
    singles, lasts = [], []
    for s, a, n in prompts:
        starts = list(range(a, a + n, chunk))
        singles += [(s, b, chunk) for b in starts[:-1]]
        lasts.append((s, starts[-1], a + n - starts[-1]))
    return singles + lasts


@pytest.mark.parametrize("seed", range(40))
def test_slices_cover_each_prompt_in_order_and_never_make_more_units(seed):
    rng = random.Random(seed)
    chunk = rng.choice([16, 48, 100, 2048])
    prompts = [(i, rng.randint(0, 40), rng.randint(2, 3 * chunk)) for i in range(rng.randint(1, 10))]
    before = _old_order(prompts, chunk)
    slices = stack_slices(before, chunk, chunk)
    for i, start, n in prompts:
        mine = [(a, t) for s, a, t in slices if s == i]
        assert mine[0][0] == start and sum(t for _, t in mine) == n
        assert all(a + t == b for (a, t), (b, _) in zip(mine, mine[1:]))  # in order, no gap, no overlap
        assert all(0 < t <= chunk for _, t in mine)
    cut = [t for s, a, t in slices if (s, a, t) not in before]  # pieces of a cut slice
    assert all(t >= 2 for t in cut) and sum(t >= MIN_CUT for t in cut) >= len(cut) // 2
    assert len(_units(slices, chunk)) <= len(_units(before, chunk))
    assert stack_slices(before, chunk, 0) == before  # no stacking: the slices as before


@pytest.mark.parametrize("states", ["vram", "host"])
@pytest.mark.parametrize("stacks", ["chunk", "pieces"])
def test_served_prompts_cut_across_stacks_get_their_tokens_alone(tiny_qwen2_dir, monkeypatch, states, stacks):
    """A streamed pass (CPU, fp32, a budget that streams layers) of four prompts of 30 tokens with 48-token
    chunks: stacks of one chunk, 3 units instead of 4; with LAYERSTREAM_STACK_PIECES=1 the pass's 120 prompt rows
    as one unit (its MLP in pieces where that long, engine/mlp_chunks.py); every request its own greedy tokens."""
    import torch

    monkeypatch.setenv("LAYERSTREAM_STACK_PIECES", "1" if stacks == "pieces" else "0")

    from tests.helpers import min_budget
    single = make_engine(tiny_qwen2_dir, batch=1, max_context=128)
    budget = min_budget(single.cfg, torch.float32, batch=4, max_context=128, prefill_chunk=48)
    multi = make_engine(tiny_qwen2_dir, batch=4, max_context=128, prefill_chunk=48, vram_budget=budget,
                        prefill_states=states)
    monkeypatch.setattr("engine.state_parking.MIN_SPAN_ELEMENTS", 1)  # the tiny model's tails are short
    units: list[list[int]] = []
    real = engine.model.stacked_runs
    monkeypatch.setattr(engine.model, "stacked_runs", lambda *a: units.append([len(r) for r in real(*a)]) or real(*a))
    try:
        assert multi.plan.streamed_layers, "the budget must stream layers"
        sched = Scheduler(multi)
        sched.runner.cost.budget = lambda floor, cap: cap  # as if two streams' time held every prompt
        prompts = random_prompts([30, 30, 30, 30], multi.cfg.vocab_size, seed=42)
        seqs = [Sequence(p, SamplingParams(max_tokens=4), multi.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        while not all(s.finished for s in seqs):
            sched.step()
        # one chunk a stack: slices 30+18 | 12+30 | 30 (each prompt alone before: four units); in pieces: 96 rows
        one = sched.runner.one_unit >= 120  # the pass's prompt rows within what one unit may hold
        assert one == (stacks == "pieces" and states == "vram")  # the host states' plan keeps less VRAM for states
        assert units[0] == ([4] if one else [2, 2, 1]), units[0]
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, 4)
    finally:
        single.close()
        multi.close()


def test_the_warm_up_runs_one_long_unit_in_pieces(tiny_qwen2_dir, monkeypatch):
    """LAYERSTREAM_STACK_PIECES=1 on a streamed engine (CPU): the warm-up runs one real pass of the one-unit rows in
    chunk-sized slices as one unit, its MLP in pieces, and a compile-only one of an odd row count; afterwards a
    request still gets its tokens alone."""
    import torch

    from engine.serving import warmup
    from tests.helpers import min_budget
    monkeypatch.setenv("LAYERSTREAM_STACK_PIECES", "1")
    monkeypatch.setattr(warmup.ahead, "wanted", lambda model: False)  # no compile-only steps but the pieces' own
    single = make_engine(tiny_qwen2_dir, batch=1, max_context=128)
    budget = min_budget(single.cfg, torch.float32, batch=4, max_context=128, prefill_chunk=48)
    multi = make_engine(tiny_qwen2_dir, batch=4, max_context=128, prefill_chunk=48, vram_budget=budget,
                        prefill_states="vram")
    units: list[list[int]] = []
    real = engine.model.stacked_runs
    monkeypatch.setattr(engine.model, "stacked_runs", lambda *a: units.append([len(r) for r in real(*a)]) or real(*a))
    pieced = []
    from engine import mlp_chunks
    run = mlp_chunks.run
    monkeypatch.setattr(mlp_chunks, "run", lambda *a: pieced.append(a[1].shape[0]) or run(*a))
    try:
        sched = Scheduler(multi)
        one = sched.runner.one_unit
        assert one > 48 and multi.plan.streamed_layers
        report = warmup.warm_up(sched)
        steps = warmup.piece_steps(4, 48, 128, one)  # the real one ran; the compile-only one needs CUDA
        assert [s for s in report.steps if s in steps] == steps[:1] and steps[0].slices[0] == 48 and steps[1].dry
        assert [len(steps[0].slices)] in units  # the real pass: one unit of its slices
        assert one in pieced  # its MLP in pieces
        prompt = random_prompts([30], multi.cfg.vocab_size, seed=4)[0]
        seq = Sequence(prompt, SamplingParams(max_tokens=4), multi.tokenizer)
        sched.add(seq)
        while not seq.finished:
            sched.step()
        assert seq.output_ids == alone(single, prompt, 4)
    finally:
        single.close()
        multi.close()
