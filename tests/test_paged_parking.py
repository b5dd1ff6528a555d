"""Host prompt states parked in a paged KV cache's never-used blocks (engine.state_parking.block_run_spans,
PagedKVCache.unused_spans, the runner): exactly those blocks' memory, no cached prefix block touched, nothing
copied to the host, and every sequence its own greedy tokens. CPU, fp32, the tiny model."""

from __future__ import annotations

import torch

import engine.model as model_mod
import engine.state_parking as parking
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts
from tests.test_serving_pass_tokens import streamed_budget  # noqa: F401 - a fixture, used by name
from tests.test_serving_scheduler import alone, engines  # noqa: F401 - a fixture, used by name


def test_block_run_spans_are_exactly_the_named_blocks(monkeypatch):
    monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 1)
    k, v = torch.zeros(2, 9, 2, 4, 3), torch.zeros(2, 9, 2, 4, 3)  # [layers, 8 blocks + scratch, heads, 4, dim]
    spans = parking.block_run_spans((k, v), [6, 0, 2, 1, 5])  # runs 0-2 and 5-6
    assert len(spans) == 2 * 2 * 2 and sum(s.numel() for s in spans) == 2 * 2 * 5 * 24
    for s in spans:
        s.fill_(7.0)
    marked = (k == 7.0).flatten(2).all(-1) & (v == 7.0).flatten(2).all(-1)  # [layers, blocks]
    assert ((k == 7.0) == (v == 7.0)).all() and ((k == 7.0).flatten(2).any(-1) == marked).all()
    assert marked.tolist() == [[True, True, True, False, False, True, True, False, False]] * 2
    monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 3 * 24)  # the two-block run is too short
    assert [s.numel() for s in parking.block_run_spans((k, v), [6, 0, 2, 1, 5])] == [72] * 4
    assert parking.block_run_spans((k, v), []) == []


def test_paged_passes_park_in_unused_blocks_and_keep_cached_prefixes(engines, tiny_qwen2_dir,  # noqa: F811
                                                                      streamed_budget, monkeypatch):  # noqa: F811
    """A prompt runs and leaves its full blocks cached; a burst of four prompts (one pass, host states)
    parks its states in the unused blocks: nothing crosses to the host, the cached blocks still hold what
    they held, the burst's sequences get their own tokens, and the first prompt again reuses its prefix
    and gets the same tokens."""
    single, _ = engines
    monkeypatch.setattr(parking, "MIN_SPAN_ELEMENTS", 1)  # the tiny model's blocks are small
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=8, vram_budget=streamed_budget,
                      prefill_states="host")
    try:
        assert eng.model.host_states and eng.plan.streamed_layers
        sched = Scheduler(eng, kv_cache="paged", block_size=4)
        sched.runner.cost.budget = lambda floor, cap: cap  # one pass for every prompt

        def run(prompts: list[list[int]], n: int) -> list[list[int]]:
            seqs = [Sequence(p, SamplingParams(max_tokens=n), eng.tokenizer) for p in prompts]
            for s in seqs:
                sched.add(s)
            while sched.has_work():
                sched.step()
            return [s.output_ids for s in seqs]

        alloc, cache = sched.blocks.alloc, sched.runner.paged[0]
        seen: list[tuple[set[int], set[int]]] = []  # each parking: the blocks its spans cover, the free ones
        real = model_mod.Parking

        def spy(spans):
            seen.append(({b for t in spans for b in _blocks(cache, t)}, set(alloc.free)))
            return real(spans)
        monkeypatch.setattr(model_mod, "Parking", spy)
        first = random_prompts([22], eng.cfg.vocab_size, seed=71)
        want = run(first, 3)
        cached = list(alloc.lru)
        assert len(cached) == 6  # 22 prompt + 2 generated tokens computed: six full 4-token blocks
        before = (cache.k[:, cached].clone(), cache.v[:, cached].clone())
        parked, moved = eng.model.parked_passes, eng.model.state_host_bytes
        burst = random_prompts([30, 3, 17, 9], eng.cfg.vocab_size, seed=72)
        got = run(burst, 4)
        assert eng.model.parked_passes > parked and eng.model.state_host_bytes == moved
        assert set(cached) <= set(alloc.lru), "the burst had free blocks enough: no cached block evicted"
        assert torch.equal(cache.k[:, cached], before[0]) and torch.equal(cache.v[:, cached], before[1])
        for p, out in zip(burst, got):
            assert out == alone(single, p, 4), f"prompt of {len(p)} tokens"
        assert len(seen) >= 2 and all(covered and covered <= free for covered, free in seen)
        hits = sched.blocks.hits
        assert run(first, 3) == want and sched.blocks.hits == hits + 20
    finally:
        eng.close()


def _blocks(cache, span: torch.Tensor) -> range:
    """The blocks of a paged cache's keys or values that a flat span covers (one layer's run)."""
    pool = cache.k if span.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr() else cache.v
    assert span.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    per_block = pool[0, 0].numel()
    first = (span.storage_offset() - pool.storage_offset()) % pool[0].numel() // per_block
    return range(first, first + span.numel() // per_block)
