"""How many prompt tokens one server pass takes (engine/serving/runner.py): with layers streaming, every
waiting prompt the plan's prompt-state reserve holds, in prefill-chunk slices; all resident, one chunk.
CPU, fp32, the tiny model; each sequence still gets its own greedy tokens."""

from __future__ import annotations

import pytest

from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts
from tests.test_serving_scheduler import alone, engines  # noqa: F401 - a fixture, used by name


@pytest.fixture(scope="module")
def streamed_budget(tiny_qwen2_dir) -> int:
    """A VRAM budget (planned for the CPU run as if it were a GPU's) that streams layers of the tiny model."""
    import torch

    from tests.helpers import min_budget
    probe = make_engine(tiny_qwen2_dir)
    try:
        return min_budget(probe.cfg, torch.float32, batch=4, max_context=64, prefill_chunk=8)
    finally:
        probe.close()


@pytest.mark.parametrize("kv", ["slots", "paged-4", "paged-3"])
@pytest.mark.parametrize("states", ["vram", "host"])
def test_with_streamed_layers_one_pass_prefills_every_waiting_prompt(engines, tiny_qwen2_dir,  # noqa: F811
                                                                     streamed_budget, kv, states, monkeypatch):
    """A streamed pass can take every waiting prompt (in slices of at most the prefill chunk) up to the
    plan's prompt-state reserve, with its states in VRAM, parked or in host memory: with a learned budget
    that allows it, four prompts of 3-30 tokens, 8-token chunks, all get their first token from the first
    pass, and every one its own greedy tokens."""
    single, _ = engines
    monkeypatch.setattr("engine.state_parking.MIN_SPAN_ELEMENTS", 1)  # the tiny model's tails are short
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=8, vram_budget=streamed_budget,
                      prefill_states=states)
    try:
        assert eng.plan.num_slots > 0 and eng.plan.streamed_layers, "the budget must stream layers"
        assert eng.model.host_states == (states == "host")
        sched = Scheduler(eng) if kv == "slots" else Scheduler(eng, kv_cache="paged", block_size=int(kv[6:]))
        assert sched.runner.pass_tokens == 4 * 63
        sched.runner.cost.budget = lambda floor, cap: cap  # as if two streams' time held every prompt
        prompts = random_prompts([30, 3, 17, 9], eng.cfg.vocab_size, seed=47)
        seqs = [Sequence(p, SamplingParams(max_tokens=5), eng.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        sched.step()
        assert [len(s.output_ids) for s in seqs] == [1, 1, 1, 1]
        assert sched.stats.last_tokens == 30 + 3 + 17 + 9
        # host states: a slot cache parks them in its rows' unreached positions, a paged one in unused blocks
        parked = states == "host"
        assert eng.model.state_host_bytes > 0 if states == "host" and not parked else eng.model.state_host_bytes == 0
        assert eng.model.parked_passes == int(parked)
        while sched.has_work():
            sched.step()
        assert sched.stats.steps == 5
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, 5), f"prompt of {len(p)} tokens"
    finally:
        eng.close()


def test_a_pass_whose_states_fit_the_vram_reserve_keeps_them_there(engines, tiny_qwen2_dir,  # noqa: F811
                                                                     streamed_budget):
    """With the plan's prompt states in host memory, a pass of two short prompts (8 tokens, within the two
    chunks' worth of VRAM the plan keeps for states) keeps its states on the device: nothing crosses."""
    single, _ = engines
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=8, vram_budget=streamed_budget,
                      prefill_states="host")
    try:
        assert eng.model.host_states and eng.plan.prefill_state_bytes == 2 * 8 * 2 * eng.cfg.hidden_size * 4
        sched = Scheduler(eng)
        prompts = random_prompts([3, 5], eng.cfg.vocab_size, seed=48)
        seqs = [Sequence(p, SamplingParams(max_tokens=4), eng.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        while sched.has_work():
            sched.step()
        assert eng.model.state_host_bytes == 0
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, 4)
    finally:
        eng.close()


def test_all_resident_a_pass_takes_one_prefill_chunk(engines):  # noqa: F811
    _, multi = engines
    assert multi.plan.num_slots == 0 and Scheduler(multi).runner.pass_tokens == 16


@pytest.mark.parametrize("states", ["vram", "host"])
def test_paged_last_slices_share_groups_within_the_chunk(engines, tiny_qwen2_dir, streamed_budget,  # noqa: F811
                                                        states, monkeypatch):
    """With a paged cache, the prompts' last slices of a pass are packed into [rows, longest] groups of at
    most the prefill chunk's tokens (a group's launches serve several prompts); each sequence still gets
    its own greedy tokens, and a prompt's earlier slices run before its last."""
    from engine.model import Model
    single, _ = engines
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=8, vram_budget=streamed_budget,
                      prefill_states=states)
    shapes: list[list[tuple[int, int]]] = []
    real = Model.forward_groups

    def spy(self, groups, *a, **k):
        shapes.append([tuple(g.ids.shape) for g in groups])
        return real(self, groups, *a, **k)
    monkeypatch.setattr(Model, "forward_groups", spy)
    try:
        sched = Scheduler(eng, kv_cache="paged", block_size=4)
        sched.runner.cost.budget = lambda floor, cap: cap  # one pass for every prompt
        prompts = random_prompts([30, 3, 17, 2], eng.cfg.vocab_size, seed=48)
        seqs = [Sequence(p, SamplingParams(max_tokens=4), eng.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        sched.step()
        # slices 8, 8, 8 | 6 (30); 3; 8, 8 | 1 (17); 2: the last slices 6, 3, 2, 1 in groups [6], [3, 2], [1]
        assert shapes[0] == [(1, 8)] * 5 + [(1, 6), (2, 3), (1, 1)]
        assert all(b * t <= 8 for b, t in shapes[0])
        assert [len(s.output_ids) for s in seqs] == [1, 1, 1, 1]
        while sched.has_work():
            sched.step()
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, 4), f"prompt of {len(p)} tokens"
    finally:
        eng.close()


PROBE_LASTS = [103, 168, 187, 236, 269, 392, 423, 427, 512, 637, 645, 734, 770, 772, 851, 866]  # bench/intake_probe.py's


@pytest.mark.parametrize("lengths,limit", [([6, 3, 1, 1], 8), (PROBE_LASTS, 1024), ([5], 3), ([1] * 9, 4), ([], 8)])
def test_pack_rows_covers_every_slice_once_within_the_limit(lengths, limit):
    from engine.serving.packing import pack_rows
    groups = pack_rows(lengths, limit)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert len(g) * longest <= limit or len(g) == 1
        assert [lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True)
    if lengths == [1] * 9:
        assert [len(g) for g in groups] == [4, 4, 1]
    if limit == 1024:
        assert len(groups) == 11  # the 16 prompts' last slices (chunk 1024): 11 groups, with 7 full slices 18 not 23


def test_decode_group_reaches_past_every_rows_cached_positions(engines, tiny_qwen2_dir,  # noqa: F811
                                                               streamed_budget):
    """A pass's decode group spans slots 0 .. the highest decoding one; a slot in that range whose prompt is
    still being prefilled (cached further than any decoding row) writes its padding at its cached length.
    The group's max_len must pass that row's cached positions too: parked states take the positions past
    it, and would otherwise overwrite that row's keys and values."""
    from types import SimpleNamespace
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=8, vram_budget=streamed_budget)
    try:
        runner = Scheduler(eng).runner
        mk = lambda slot, n: SimpleNamespace(slot=slot, num_computed=n, all_ids=list(range(n + 1)))  # noqa: E731
        decoding, prefilling = mk(2, 9), mk(0, 40)
        group, _ = runner._decode_group([prefilling, decoding], [decoding])
        assert group.ids.shape == (3, 1) and group.start_pos.tolist() == [40, 0, 9]
        assert group.max_len == 41  # not 10: slot 0 holds 40 cached positions and pads position 40
    finally:
        eng.close()
