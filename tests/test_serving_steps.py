"""The scheduler's steps on a tiny model (CPU): pure decode through the decode graph, paged decode reading
blocks in place, an arrival that never stalls the decoding rows, mixed steps without padding, one draw per
parameter set; each request still gets the tokens it gets alone."""

from __future__ import annotations

import pytest

from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts
from tests.sched_helpers import alone, engines, run_all, scheduler_for  # noqa: F401  (engines: a fixture)


def test_decode_steps_replay_the_graph(tiny_qwen2_dir, engines):
    """Pure decode steps go through the engine's decode graph at its full batch; idle rows are padding."""
    from tests.helpers import CpuDecodeGraph

    single, _ = engines
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=64, prefill_chunk=16)
    calls = []

    class Counting(CpuDecodeGraph):  # the pure decode steps' replays (mixed passes replay its pieces directly)
        def __call__(self, tok, start):
            calls.append(tok.shape[0])
            return super().__call__(tok, start)

    eng.graph = Counting(eng.model, eng.cache, 4)
    try:
        prompts = random_prompts([4, 12], eng.cfg.vocab_size, seed=5)
        seqs = [Sequence(p, SamplingParams(max_tokens=6), eng.tokenizer) for p in prompts]
        run_all(Scheduler(eng), seqs, {1: 2})
    finally:
        eng.close()
    assert calls and set(calls) == {4}
    for p, s in zip(prompts, seqs):
        assert s.output_ids == alone(single, p, 6)


@pytest.mark.slow
def test_paged_decode_reads_blocks_in_place_with_triton_kernels(tiny_qwen2_dir):
    """Triton kernels (interpreted on the CPU): decode steps, and the decode group of mixed steps, skip the
    gather and use the block-table kernel."""
    slots_eng = make_engine(tiny_qwen2_dir, batch=3, max_context=64, prefill_chunk=16, kernels="triton")
    paged_eng = make_engine(tiny_qwen2_dir, batch=3, max_context=64, prefill_chunk=16, kernels="triton")
    prompts = random_prompts([3, 9, 20], slots_eng.cfg.vocab_size, seed=31)
    runs = []
    for sched in (Scheduler(slots_eng), Scheduler(paged_eng, kv_cache="paged", block_size=16)):
        seqs = [Sequence(p, SamplingParams(max_tokens=n), sched.engine.tokenizer) for p, n in zip(prompts, [2, 5, 4])]
        # the third takes the first's slot 0 while the second decodes in slot 1: the decode group's
        # row 0 reads no block in the mixed steps
        run_all(sched, seqs, {2: 4})
        runs.append([s.output_ids for s in seqs])
    assert sched.runner.paged[0].direct_steps >= 4  # the decode steps of the paged run
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kv", ["slots", "paged-4"])
def test_an_arrival_never_stalls_the_decoding_sequences(engines, tiny_qwen2_dir, kv):
    """While a long prompt is prefilled in chunks over several passes, every running sequence gets a token
    in every pass."""
    single, multi = engines
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    short, long = random_prompts([3, 40], single.cfg.vocab_size, seed=41)
    a = Sequence(short, SamplingParams(max_tokens=30), multi.tokenizer)
    b = Sequence(long, SamplingParams(max_tokens=3), multi.tokenizer)
    sched.add(a)
    sched.step()
    sched.step()
    sched.add(b)
    passes = 0
    while not b.output_ids:
        before = len(a.output_ids)
        sched.step()
        passes += 1
        assert len(a.output_ids) == before + 1, f"pass {passes}: the decoding sequence stalled"
    assert passes == -(-40 // (16 - 1))  # the prompt's slices ride beside the decode token: chunk - 1 a pass


@pytest.mark.parametrize("kv", ["slots", "paged-4", "paged-3"])
def test_a_mixed_step_computes_no_padding(engines, tiny_qwen2_dir, monkeypatch, kv):
    """Two decoding rows next to a prompt slice: the positions each layer computes (the rows RoPE
    rotates) are exactly the tokens fed, 2 + (prefill_chunk - 2), where a padded step computed
    3 rows x (16 // 3) for 2 + 5 real tokens."""
    single, multi = engines
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    eng = sched.engine
    prompts = random_prompts([3, 5, 30], single.cfg.vocab_size, seed=43)
    seqs = [Sequence(p, SamplingParams(max_tokens=n), eng.tokenizer) for p, n in zip(prompts, [12, 12, 4])]
    sched.add(seqs[0])
    sched.add(seqs[1])
    sched.step()  # both prompts in one grouped step
    sched.add(seqs[2])
    rotated: list[int] = []
    rope = eng.model.ops.rope_

    def counting(q, k, cos, sin, positions):
        rotated.append(q.shape[0] * q.shape[1])
        return rope(q, k, cos, sin, positions)

    monkeypatch.setattr(eng.model.ops, "rope_", counting)
    sched.step()
    monkeypatch.undo()
    layers = eng.cfg.num_hidden_layers
    assert sched.stats.last_tokens == 16 and sum(rotated) == 16 * layers
    assert sorted(set(rotated)) == [2, 14]  # the decode group [2, 1], the slice [1, 14]
    while sched.has_work():
        sched.step()
    for p, s in zip(prompts, seqs):
        assert s.output_ids == alone(single, p, len(s.output_ids))


def test_unseeded_rows_share_one_draw_per_parameter_set(engines, tiny_qwen2_dir):
    """top_k=1 sampling is the argmax: rows drawn together (no seed) still get each their own greedy tokens."""
    single, multi = engines
    sched = scheduler_for("slots", tiny_qwen2_dir, multi)
    prompts = random_prompts([5, 11, 2], single.cfg.vocab_size, seed=51)
    params = SamplingParams(temperature=0.8, top_k=1, max_tokens=5)
    seqs = [Sequence(p, params, multi.tokenizer) for p in prompts]
    run_all(sched, seqs)
    assert list(sched.runner.rows.samplers) == [params.token_params(0)]  # one shared sampler for the three
    for p, s in zip(prompts, seqs):
        assert s.output_ids == alone(single, p, 5)
