"""The server's warm-up (engine/serving/warmup.py): the shapes it plans and runs, and that it leaves nothing."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest

from engine.generate import generate
from engine.sampling import SamplingParams as TokenParams
from engine.serving import warmup
from engine.serving.loop import EngineLoop
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler, StepStats
from engine.serving.sequence import Sequence
from engine.serving.warmup import WarmStep, plan_warmup, warm_up
from engine.serving.warmup_plan import GEMV_MAX_M
from tests.helpers import make_engine, random_prompts


def test_gemv_range_matches_the_kernels():
    from kernels.linear import GEMV_MAX_M as kernels_max

    assert GEMV_MAX_M == kernels_max


def test_plan_for_the_h200_serving_run():
    """--max-batch 32 --max-context 2304, prefill chunk 2048 (bench/results/2026-12-01-h200-s7-serve-hostlane)."""
    steps = plan_warmup(32, 2048, 2304, eager_decode=False, dry=True)
    real = [s for s in steps if not s.dry]
    assert [s.slices for s in real if s.kind == "prefill"] == [(2048,), (1024, 512, 256, 128)]  # every GEMM bucket
    assert [(s.decoding + len(s.slices), s.slices) for s in real if s.kind == "mixed"] == [(16, (128,)), (32, (128,))]
    assert not any(s.kind == "decode" for s in steps)  # the decode graph replays pure decode steps
    mixed = {(s.decode_rows, s.context) for s in steps if s.dry and s.kind == "mixed"}
    assert mixed == {(r, c) for r in range(1, 33) for c in (256, 512, 1024, 2048, 2303)}
    sizes = {n for s in steps if s.dry and s.kind == "prefill" for n in s.slices}
    assert {127, 128, 1023, 1024, 2047, 2048, 2, 3, 63, 64} <= sizes and max(sizes) == 2048
    assert plan_warmup(32, 2048, 2304, eager_decode=True, dry=False) == real  # eager decode runs untuned
    assert not any(s.cached for s in steps)  # no later slice fits a 2304-token context after 2048 cached
    later = [(s.slices, s.cached) for s in plan_warmup(32, 1024, 2304, eager_decode=False, dry=True) if s.cached]
    assert later == [((512,), 1024), ((513,), 1024), ((1023,), 1024)]  # the plan's 1024-token chunk at 6 GiB
    paged = plan_warmup(32, 2048, 2304, eager_decode=True, dry=True, block_size=16)
    widths = (1, 2, 4, 8, 15, 16, 31, 32, 63, 64, 127, 128)  # then the last, partial block of 2303 tokens
    assert {(s.decode_rows, s.context) for s in paged if s.kind == "mixed" and s.dry} == \
        {(r, c) for r in range(1, 33) for c in [16 * w for w in widths] + [2303]}
    # eager pure decode: the same layer shapes as the mixed steps' decode group; a pass per row count for the head
    assert [(s.decode_rows, s.context) for s in paged if s.kind == "decode"] == [(r, 16) for r in range(1, 33)]


def test_a_split_inside_a_bucket_gets_a_real_slice():
    """A quantized model's fused qgemm takes up to DENSE_MIN_M - 1 rows, inside the dense GEMM's 256 bucket: the
    H200's AWQ server tuned that bucket in its first 16-client pass (10 builds, 11.2 s) until it had a slice."""
    plain = plan_warmup(32, 2048, 2304, eager_decode=False, dry=True)
    split = plan_warmup(32, 2048, 2304, eager_decode=False, dry=True, splits=(255,))
    real = sorted(n for s in split if s.kind == "prefill" and not s.dry for n in s.slices)
    assert real == [128, 255, 256, 512, 1024, 2048]
    assert [s for s in split if s.dry] == [s for s in plain if s.dry]
    for s in split:
        assert sum(s.slices) + s.decoding <= 2048 and s.decoding + len(s.slices) <= 32
    # a split at a bucket's own size, below the GEMM range or past the chunk adds nothing
    assert plan_warmup(32, 2048, 2304, False, True, splits=(256, 100, 4000)) == plain


@pytest.mark.parametrize("quant", [None, "awq"])
def test_warm_up_passes_the_quantized_split(tmp_path, monkeypatch, quant):
    from engine.synth.writer import synthesize
    from kernels.qlinear import DENSE_MIN_M

    d = synthesize("tiny-qwen2", tmp_path / "m", quant=quant, layers=1, device="cpu")
    eng = make_engine(d, batch=2, max_context=64, prefill_chunk=32)
    seen = []
    monkeypatch.setattr(warmup, "plan_warmup", lambda *a, **k: seen.append(k["splits"]) or [])
    try:
        warm_up(Scheduler(eng))
    finally:
        eng.close()
    assert seen == [(DENSE_MIN_M - 1,) if quant else ()]


@pytest.mark.parametrize("unit", [True, False])
def test_warm_up_runs_the_decode_group_eagerly(tiny_qwen2_dir, monkeypatch, unit):
    """The warm-up's passes run with the graph unit off (served passes the unit cannot take run the decode group
    eagerly: its kernels must be built by then); the runner's setting is back afterwards, also after a failure."""
    eng = make_engine(tiny_qwen2_dir, batch=2, max_context=64, prefill_chunk=32)
    sched = Scheduler(eng)
    sched.runner.graph_unit = unit
    seen, step = [], sched.runner.step
    monkeypatch.setattr(sched.runner, "step", lambda seqs: seen.append(sched.runner.graph_unit) or step(seqs))
    try:
        warm_up(sched)
        assert seen and not any(seen)
        assert sched.runner.graph_unit is unit
        monkeypatch.setattr(warmup, "_warm", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            warm_up(sched)
        assert sched.runner.graph_unit is unit
    finally:
        eng.close()


@pytest.mark.parametrize("batch,chunk,ctx,eager", [(1, 16, 64, True), (4, 256, 512, False), (5, 1536, 1000, True),
                                                    (3, 100, 64, True), (40, 512, 4096, True), (2, 2, 8, False)])
def test_every_planned_step_fits_the_scheduler(batch, chunk, ctx, eager):
    """Slots, the prefill chunk and the context bound every step, as they bound the scheduler's steps."""
    steps = plan_warmup(batch, chunk, ctx, eager_decode=eager, dry=True, block_size=4 if eager else None)
    eff = min(chunk, ctx)
    for s in steps:
        assert s.decoding + len(s.slices) <= batch and s.decode_rows <= batch and s.decoding <= s.decode_rows
        assert sum(s.slices) + s.decoding <= eff and all(n >= 2 for n in s.slices)
        assert (s.decoding >= 1) == (s.decode_rows >= 1) and 1 <= s.context < ctx or s.decode_rows == 0
    gemm = [b for b in (128, 256, 512, 1024, 2048) if b // 2 < eff]
    assert sorted(n for s in steps if s.kind == "prefill" and not s.dry for n in s.slices) == \
        sorted(min(b, eff) for b in gemm) or not gemm
    if eager:
        assert {s.decode_rows for s in steps if s.kind == "decode" and s.dry} == set(range(1, batch + 1))
    assert steps[0].slices == (eff,) and steps[0].decode_rows == 0 or eff < 2  # one picked row: lm_head M = 1


def _spy(monkeypatch, eng) -> list[tuple[str, list[tuple[int, int]]]]:
    """Record each pass's groups as (rows, tokens) shapes."""
    calls = []
    model = eng.model
    forward_groups, forward = model.forward_groups, model.forward

    def groups(gs, *a, **k):
        calls.append(("groups", [tuple(g.ids.shape) for g in gs]))
        return forward_groups(gs, *a, **k)

    def plain(ids, *a, **k):
        calls.append(("forward", [tuple(ids.shape)]))
        return forward(ids, *a, **k)

    monkeypatch.setattr(model, "forward_groups", groups)
    monkeypatch.setattr(model, "forward", plain)
    return calls


def _expected(step: WarmStep) -> tuple[str, list[tuple[int, int]]]:
    if not step.slices:
        return "forward", [(step.decode_rows, 1)]
    # the runner feeds a pass's prompts fewest tokens first (stable among equals)
    return "groups", ([(step.decode_rows, 1)] if step.decode_rows else []) + [(1, n) for n in sorted(step.slices)]


@pytest.mark.parametrize("kv", ["slots", "paged-16", "paged-4"])
def test_warm_up_runs_its_shapes_and_leaves_nothing(tiny_qwen2_dir, monkeypatch, kv):
    """Real and (here run for real: no GPU) compile-only steps each make the pass they claim; afterwards the
    KV storage is zero, no block is held or cached, counters are untouched, and requests get their own tokens."""
    monkeypatch.setattr(warmup.ahead, "wanted", lambda model: True)
    monkeypatch.setattr(warmup.ahead, "dry", lambda model: contextlib.nullcontext())
    eng = make_engine(tiny_qwen2_dir, batch=4, max_context=512, prefill_chunk=256)
    paged = kv != "slots"
    sched = Scheduler(eng, kv_cache="paged", block_size=int(kv.split("-")[1])) if paged else Scheduler(eng)
    calls = _spy(monkeypatch, eng)
    stacked = []  # the warm-up's slices tune their own row buckets: never stacked (engine.model.layer_stacked)
    monkeypatch.setattr(type(eng.model), "layer_stacked", lambda *a: stacked.append(a))
    report = warm_up(sched)
    monkeypatch.undo()
    try:
        assert not stacked and sched.runner.stack_rows == 256  # stacking back on for the served passes
        # a stack longer than a chunk (LAYERSTREAM_STACK_PIECES=1; served passes stack only where layers stream)
        assert warmup.piece_steps(4, 256, 512, 576) == [warmup.WarmStep(False, 0, 0, 0, (256, 256, 64)),
                                                        warmup.WarmStep(True, 0, 0, 0, (256, 256, 63))]
        assert warmup.piece_steps(4, 256, 512, 256) == []
        assert report.steps == plan_warmup(4, 256, 512, eager_decode=True, dry=True,
                                           block_size=int(kv.split("-")[1]) if paged else None)
        assert not report.skipped and any(s.dry for s in report.steps)
        assert calls == [_expected(s) for s in report.steps]
        assert {n for s in report.steps if not s.dry for n in s.slices} >= {256, 128}
        assert any(s.kind == "mixed" and not s.dry and s.decoding + 1 == 4 for s in report.steps)
        cache = sched.runner.paged[0] if paged else eng.cache
        assert not cache.k.any() and not cache.v.any()
        if paged:
            alloc = sched.blocks.alloc
            assert alloc.available == alloc.num_blocks and not alloc.by_hash and not alloc.lru
            assert not sched.blocks.tables and sched.blocks.hits == 0 and cache.direct_steps == 0
        assert sched.stats == StepStats() and sched.runner.steps == 0 and not sched.runner.rows.samplers
        single = make_engine(tiny_qwen2_dir, batch=1, max_context=512)
        prompts = random_prompts([5, 40, 17], eng.cfg.vocab_size, seed=3)
        seqs = [Sequence(p, SamplingParams(max_tokens=6), eng.tokenizer) for p in prompts]
        for s in seqs:
            sched.add(s)
        while sched.has_work():
            sched.step()
        assert sched.stats.cached_prompt_tokens == 0  # nothing of the warm-up served as a prefix
        for p, s in zip(prompts, seqs):
            assert s.output_ids == generate(single, [p], TokenParams(), max_new_tokens=6).token_ids[0]
        single.close()
    finally:
        eng.close()


def test_health_says_warming_up_until_the_warm_up_ends(tiny_qwen2_dir):
    pytest.importorskip("uvicorn")
    from tests.serve_helpers import app_server, get, post

    gate, started = threading.Event(), threading.Event()

    def slow_warm_up(sched):
        started.set()
        gate.wait(30)
        return warm_up(sched)

    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=256), warmup=slow_warm_up).start()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with app_server(loop) as url:
        try:
            assert started.wait(30)
            status, body, _ = get(url + "/health")
            assert status == 503 and json.loads(body)["status"] == "warming up"
            status, out, _ = post(url + "/v1/chat/completions", chat)
            assert status == 503 and "warming up" in out["error"]["message"]
            gate.set()
            assert loop.ready.wait(60) and loop.warmup_report is not None
            assert get(url + "/health")[0] == 200
            assert post(url + "/v1/chat/completions", chat)[0] == 200
        finally:
            gate.set()


def test_a_failing_warm_up_does_not_stop_the_server(tiny_qwen2_dir):
    def broken(sched):
        raise RuntimeError("out of memory (simulated)")

    loop = EngineLoop(lambda: make_engine(tiny_qwen2_dir, batch=2, max_context=64), warmup=broken).start()
    try:
        assert loop.ready.wait(60) and loop.error is None and loop.phase == "ready"
        out = []
        done = threading.Event()
        seq = Sequence([1, 2, 3], SamplingParams(max_tokens=2), loop.engine.tokenizer,
                       sink=lambda o: (out.append(o), o.finished and done.set()))
        loop.submit([seq])
        assert done.wait(60) and len(seq.output_ids) == 2
    finally:
        loop.close()



def test_server_warms_up_and_reports_none_of_it(tiny_qwen2_dir):
    """A warmed-up paged server: /metrics counts no step, token or cached block before the first request,
    says what the warm-up ran, and answers as a server started with --no-warmup."""
    from tests.serve_helpers import Server, post

    flags = ("--served-model-name", "m", "--max-batch", "3", "--max-context", "256", "--prefill-chunk", "128",
             "--kv-cache", "paged")
    answers, errs = [], []
    for extra in ((), ("--no-warmup",)):
        srv = Server(tiny_qwen2_dir, *flags, *extra)
        try:
            for name in ("layerstream_steps_total", "layerstream_prompt_tokens_total",
                         "layerstream_generation_tokens_total", "layerstream_prefix_cache_hit_tokens_total",
                         "layerstream_kv_blocks_cached", "layerstream_kv_blocks_in_use"):
                assert srv.metric(name) == 0, name
            body = {"model": "m", "prompt": list(range(3, 60)), "max_tokens": 5, "temperature": 0, "ignore_eos": True}
            status, out, _ = post(srv.url + "/v1/completions", body)
            assert status == 200 and srv.metric("layerstream_prefix_cache_hit_tokens_total") == 0
            answers.append(out["choices"][0]["text"])
        finally:
            errs.append(srv.stop()[1])
    assert answers[0] == answers[1]
    assert "warm-up: " in errs[0] and "real passes" in errs[0] and "warm-up" not in errs[1].replace("--no-warmup", "")


def test_compile_only_passes_stop_at_the_time_limit(tiny_qwen2_dir, monkeypatch):
    monkeypatch.setattr(warmup.ahead, "wanted", lambda model: True)
    monkeypatch.setattr(warmup.ahead, "dry", lambda model: contextlib.nullcontext())
    eng = make_engine(tiny_qwen2_dir, batch=2, max_context=64, prefill_chunk=16)
    try:
        report = warm_up(Scheduler(eng), dry_limit_s=0.0)
    finally:
        eng.close()
    planned = plan_warmup(2, 16, 64, eager_decode=True, dry=True)
    assert report.steps == [s for s in planned if not s.dry]  # here: the chunk alone, then 1 row + a slice
    assert report.cut == sum(s.dry for s in planned) > 0 and "left out at the time limit" in report.summary()
