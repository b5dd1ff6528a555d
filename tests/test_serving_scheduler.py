"""The continuous-batching scheduler on a tiny model (CPU, fp32): every request gets its own tokens."""

from __future__ import annotations

import pytest

from engine.serving.params import SamplingParams
from engine.serving.scheduler import QueueFull, Scheduler
from engine.serving.sequence import Sequence
from tests.helpers import make_engine, random_prompts
from tests.sched_helpers import alone, engines, run_all, scheduler_for  # noqa: F401  (engines: a fixture)


KV = ["slots", "paged-4", "paged-3", "paged-1"]


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("lengths,news,arrivals", [
    ([5, 17, 1, 33], [7, 3, 9, 5], {}),  # all at once: mixed prompt lengths, 2-3 prefill chunks
    ([9, 2, 20, 4, 11, 6], [6, 8, 4, 10, 3, 5], {1: 2, 2: 3, 3: 3, 4: 5, 5: 9}),  # joins mid-flight, > slots
])
def test_greedy_matches_alone(engines, tiny_qwen2_dir, kv, lengths, news, arrivals):
    single, multi = engines
    vocab = single.cfg.vocab_size
    prompts = random_prompts(lengths, vocab, seed=len(lengths))
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    seqs = [Sequence(p, SamplingParams(max_tokens=n), multi.tokenizer) for p, n in zip(prompts, news)]
    run_all(sched, seqs, arrivals)
    for p, n, s in zip(prompts, news, seqs):
        assert s.output_ids == alone(single, p, n), f"prompt of {len(p)} tokens"
        assert s.finish_reason == "length"
        assert s.text == multi.tokenizer.decode(s.output_ids, skip_special_tokens=True)
    assert sorted(sched.free_slots) == [0, 1, 2, 3] and not sched.running and not sched.waiting
    if sched.blocks is not None:
        assert not sched.blocks.tables and sched.blocks.alloc.in_use == 0


@pytest.mark.parametrize("kv", ["paged-4", "paged-5"])
def test_prefix_blocks_are_reused_and_give_the_same_tokens(engines, tiny_qwen2_dir, kv):
    """A shared 24-token prefix: later requests (one joining while the first runs) skip its prefill."""
    single, multi = engines
    shared = random_prompts([24], single.cfg.vocab_size, seed=21)[0]
    tails = random_prompts([3, 6, 1], single.cfg.vocab_size, seed=22)
    prompts = [shared + t for t in tails]
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    seqs = [Sequence(p, SamplingParams(max_tokens=6), multi.tokenizer) for p in prompts]
    run_all(sched, seqs, {1: 6, 2: 40})  # 1 joins while 0 decodes; 2 after both finished
    bs = sched.blocks.block_size
    assert sched.stats.cached_prompt_tokens == 2 * (24 // bs * bs)
    for p, s in zip(prompts, seqs):
        assert s.output_ids == alone(single, p, 6)
    assert sched.blocks.alloc.in_use == 0 and sched.blocks.alloc.available == sched.blocks.alloc.num_blocks


def test_paged_admission_waits_for_blocks(tiny_qwen2_dir, engines):
    """Blocks for two worst cases only: the third waits with slots free, then runs; nothing is corrupted."""
    single, _ = engines
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=32, prefill_chunk=16)
    sched = Scheduler(eng, kv_cache="paged", block_size=4, num_blocks=20)
    prompts = random_prompts([29, 30, 28], single.cfg.vocab_size, seed=9)
    seqs = [Sequence(p, SamplingParams(max_tokens=2), eng.tokenizer) for p in prompts]  # 8 blocks each
    for s in seqs:
        sched.add(s)
    sched.step()
    assert len(sched.running) == 2 and len(sched.waiting) == 1 and len(sched.free_slots) == 2
    with pytest.raises(ValueError, match="cannot hold one 32-token context"):
        Scheduler(make_engine(tiny_qwen2_dir, batch=1, max_context=32), kv_cache="paged", block_size=4,
                  num_blocks=7)
    while sched.has_work():
        sched.step()
    for p, s in zip(prompts, seqs):
        assert s.output_ids == alone(single, p, 2)


def test_seeded_sampling_is_independent_of_batch(engines):
    single, multi = engines
    prompts = random_prompts([6, 13, 3], single.cfg.vocab_size, seed=7)
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=8)
    together = [Sequence(p, params, multi.tokenizer) for p in prompts]
    run_all(Scheduler(multi), together)
    for p, s in zip(prompts, together):
        solo = Sequence(p, params, multi.tokenizer)
        run_all(Scheduler(multi), [solo])
        assert s.output_ids == solo.output_ids
        assert s.output_ids == alone(single, p, 8, params.token_params(0))


def test_stop_strings_and_eos(engines):
    single, multi = engines
    prompt = random_prompts([8], single.cfg.vocab_size, seed=3)[0]
    full = Sequence(prompt, SamplingParams(max_tokens=12), multi.tokenizer)
    run_all(Scheduler(multi), [full])
    text = full.text
    cut = next(i for i in range(3, len(text)) if text[i - 2:i].strip())  # a stop string inside the text
    stop = text[cut - 2:cut]
    s = Sequence(prompt, SamplingParams(max_tokens=12, stop=(stop,)), multi.tokenizer)
    run_all(Scheduler(multi), [s])
    assert s.finish_reason == "stop" and s.text == text[: text.find(stop)]
    eos_tok = full.output_ids[2]
    multi.tokenizer.eos_ids = {eos_tok}
    try:
        e = Sequence(prompt, SamplingParams(max_tokens=12), multi.tokenizer)
        run_all(Scheduler(multi), [e])
        ignored = Sequence(prompt, SamplingParams(max_tokens=12, ignore_eos=True), multi.tokenizer)
        run_all(Scheduler(multi), [ignored])
    finally:
        multi.tokenizer.eos_ids = set()
    first = full.output_ids.index(eos_tok)
    assert e.finish_reason == "stop" and e.output_ids == full.output_ids[:first]
    assert ignored.output_ids == full.output_ids


def test_abort_frees_the_slot_and_queue_is_bounded(engines):
    _, multi = engines
    sched = Scheduler(multi, max_waiting=2)
    outs = []
    seqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=20), multi.tokenizer, sink=outs.append) for _ in range(6)]
    for s in seqs:  # 4 free slots + 2 waiting places
        sched.add(s)
    with pytest.raises(QueueFull):
        sched.add(Sequence([1], SamplingParams(), multi.tokenizer))
    sched.step()
    assert len(sched.running) == 4 and len(sched.waiting) == 2
    assert sched.abort(seqs[1].seq_id) and sched.abort(seqs[5].seq_id)
    assert seqs[1].finish_reason == "abort" and seqs[1].slot is None and seqs[5].finish_reason == "abort"
    sched.step()
    assert seqs[4].slot == 1 and len(sched.running) == 4 and not sched.waiting
    assert [o.finish_reason for o in outs if o.finished] == ["abort", "abort"]
    assert not sched.abort(10**9)


def test_paged_abort_mid_decode_frees_its_blocks(engines, tiny_qwen2_dir):
    """A sequence aborted while decoding (a client gone) gives its blocks back at once; the others'
    tokens are still those of each prompt alone, and a request that waited for blocks then runs."""
    single, _ = engines
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=32, prefill_chunk=16)
    sched = Scheduler(eng, kv_cache="paged", block_size=4, num_blocks=8)  # room for the first two (4 blocks each)
    prompts = random_prompts([10, 7, 12], single.cfg.vocab_size, seed=31)
    seqs = [Sequence(p, SamplingParams(max_tokens=6), eng.tokenizer) for p in prompts]
    for s in seqs:
        sched.add(s)
    for _ in range(3):
        sched.step()
    assert len(sched.running) == 2 and len(sched.waiting) == 1
    held = sched.blocks.alloc.in_use
    assert sched.abort(seqs[0].seq_id) and seqs[0].finish_reason == "abort"
    assert sched.blocks.alloc.in_use < held and seqs[0].seq_id not in sched.blocks.tables
    while sched.has_work():
        sched.step()
    for p, s in zip(prompts[1:], seqs[1:]):
        assert s.output_ids == alone(single, p, 6)
    assert sched.blocks.alloc.in_use == 0


@pytest.mark.parametrize("kv", ["slots", "paged-4"])
def test_awq_model_greedy_matches_alone(tmp_path_factory, kv):
    """A packed int4 (AWQ) checkpoint through the scheduler: requests joining mid-flight each get the
    tokens of their prompt alone on the same checkpoint."""
    from engine.synth.writer import synthesize

    d = synthesize("tiny-qwen2", tmp_path_factory.mktemp("awq") / "m", quant="awq", seed=3)
    single = make_engine(d, batch=1, max_context=64)
    multi = make_engine(d, batch=4, max_context=64, prefill_chunk=16)
    try:
        sched = scheduler_for(kv, d, multi)
        prompts = random_prompts([9, 21, 3, 14, 6], single.cfg.vocab_size, seed=13)
        seqs = [Sequence(p, SamplingParams(max_tokens=n), multi.tokenizer) for p, n in zip(prompts, [5, 3, 7, 4, 6])]
        run_all(sched, seqs, {1: 1, 2: 2, 3: 2, 4: 4})
        for p, s in zip(prompts, seqs):
            assert s.output_ids == alone(single, p, len(s.output_ids)) and s.output_ids
    finally:
        single.close()
        multi.close()


@pytest.mark.parametrize("kv", ["slots", "paged-4"])
def test_nonfinite_logits_fail_that_request_only(engines, tiny_qwen2_dir, monkeypatch, kv):
    """A sequence whose logits row comes out NaN (an fp16 overflow) finishes "abort" with a message saying
    so; the others, greedy and sampled, go on and get the tokens of their prompts alone."""
    single, multi = engines
    sched = scheduler_for(kv, tiny_qwen2_dir, multi)
    prompts = random_prompts([7, 19, 4], single.cfg.vocab_size, seed=17)
    sampled = SamplingParams(max_tokens=5, temperature=0.9, top_p=0.8)
    seqs = [Sequence(prompts[0], SamplingParams(max_tokens=5), multi.tokenizer),
            Sequence(prompts[1], sampled, multi.tokenizer), Sequence(prompts[2], SamplingParams(max_tokens=5),
                                                                      multi.tokenizer)]
    runner, broken, passes, at = sched.runner, seqs[1], [0], []
    for name in ("_grouped", "_padded"):
        real = getattr(runner, name)

        def poisoned(ss, _real=real):
            logits, q_lens = _real(ss)
            passes[0] += 1
            if passes[0] == 4 and broken.slot is not None:  # a token after its first
                logits[broken.slot, 5] = float("nan")
                at.append(len(broken.output_ids))
            return logits, q_lens
        monkeypatch.setattr(runner, name, poisoned)
    run_all(sched, seqs)
    assert at and at[0] >= 1 and len(broken.output_ids) == at[0] and broken.finish_reason == "abort"
    assert f"non-finite logits (NaN or inf) in float32 after {at[0]} generated tokens" in broken.error
    for p, s in ((prompts[0], seqs[0]), (prompts[2], seqs[2])):
        assert s.error is None and s.output_ids == alone(single, p, 5)
    assert broken.slot is None and not sched.running


def test_request_too_long_names_the_counts(engines):
    _, multi = engines
    sched = Scheduler(multi)
    with pytest.raises(ValueError, match=r"60 prompt tokens \+ 10 max_tokens = 70"):
        sched.add(Sequence([1] * 60, SamplingParams(max_tokens=10), multi.tokenizer))
    with pytest.raises(ValueError, match="out of range"):
        sched.add(Sequence([multi.cfg.vocab_size], SamplingParams(), multi.tokenizer))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(n=0), dict(n=True), dict(presence_penalty=3.0),
                                 dict(stop=("",)), dict(temperature=-1.0), dict(top_p=0.0)])
def test_params_reject_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_penalties(engines):
    single, multi = engines
    prompt = random_prompts([10], single.cfg.vocab_size, seed=11)[0]
    rep = SamplingParams(max_tokens=10, repetition_penalty=1.3)
    s = Sequence(prompt, rep, multi.tokenizer)
    run_all(Scheduler(multi), [s])
    assert s.output_ids == alone(single, prompt, 10, rep.token_params(0))  # Hugging Face's penalty, as generate
    plain = Sequence(prompt, SamplingParams(max_tokens=24), multi.tokenizer)
    presence = Sequence(prompt, SamplingParams(max_tokens=24, presence_penalty=2.0), multi.tokenizer)
    run_all(Scheduler(multi), [plain, presence])
    assert len(set(plain.output_ids)) < len(plain.output_ids), "the greedy stream should repeat itself"
    assert len(set(presence.output_ids)) > len(set(plain.output_ids))
