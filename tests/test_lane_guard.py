"""engine.lane_guard: an auto host lane that makes decode steps slower than streaming is retired mid-run (CPU)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from engine.generate import generate
from engine.sampling import SamplingParams
from tests.helpers import make_engine, make_hf_model, random_prompts
from tests.test_host_lane import _host_engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("lane_guard"), tokenizer_dir=tokenizer_dir)
    return d


@pytest.mark.parametrize("stream_step_s,retired", [(1e-9, True), (1e9, False)], ids=["loses", "wins"])
def test_a_losing_auto_lane_is_retired_mid_generation_and_the_tokens_stay_the_same(model_dir, caplog, stream_step_s,
                                                                                   retired):
    """engine.lane_guard: with the plan's step without host layers set below any real step, generate retires the
    lane after WARM + WINDOW decode steps: the host layers' keys go back to the device cache and stream from then
    on, and the tokens equal the all-resident engine's over the whole generation; set above, the lane stays."""
    from engine import lane_guard

    prompts = random_prompts([5, 9], 512, seed=3)
    ref = make_engine(model_dir, batch=2)
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=16).token_ids
    ref.close()
    ours = _host_engine(model_dir, 2, 0, None, 2)
    lane = dataclasses.replace(ours.plan.host_lane, mode="auto", stream_step_s=stream_step_s)
    ours.plan = plan_before = dataclasses.replace(ours.plan, host_lane=lane)
    with caplog.at_level(logging.WARNING, logger="engine.lane_guard"):
        got = generate(ours, prompts, SamplingParams(), max_new_tokens=16).token_ids
    assert got == want
    assert (ours.model.host is None) == retired
    assert any("host lane retired" in r.message for r in caplog.records) == retired
    if retired:  # the next generation streams every layer from the start, and the plan says so
        assert ours.plan.host_lane is None and ours.weights.plan is ours.plan
        assert all(ours.plan.module(f"layers.{i}").placement == "streamed" for i in lane.layers)
        assert ours.plan.streamed_bytes_per_step > plan_before.streamed_bytes_per_step
        assert ours.plan.predicted_step_s == lane.stream_step_s
        assert generate(ours, prompts, SamplingParams(), max_new_tokens=6).token_ids == [w[:6] for w in want]
    assert lane_guard.WARM + lane_guard.WINDOW < 16
    ours.close()


def test_the_guard_judges_each_window_after_its_warm_up_and_retires_once():
    from engine.lane_guard import WARM, WINDOW, LaneGuard

    g = LaneGuard(0.1)  # limit 0.11 s
    slow = [5.0] * WARM + [0.12] * (WINDOW // 2) + [0.05] * (WINDOW - WINDOW // 2 - 1)
    assert not any(g.observe(s) for s in slow)  # warm-up steps never count; one step short of the window
    assert g.observe(0.12) and g.measured == pytest.approx(0.12)  # median of 0.12 x 4, 0.05 x 2 over 0.11
    assert not any(g.observe(9.0) for _ in range(2 * WINDOW))  # retired: never again
    later = LaneGuard(0.1)  # wins for two windows, then the host slows down: the third window retires it
    steps = [5.0] * WARM + [0.105] * (2 * WINDOW) + [0.2] * (WINDOW - 1)
    assert not any(later.observe(s) for s in steps) and later.windows == 2
    assert later.observe(0.2) and later.windows == 3 and later.measured == pytest.approx(0.2)
    one_slow = LaneGuard(0.1)  # a slow step or two inside a window does not move its median
    assert not any(one_slow.observe(s) for s in [5.0] * WARM + [0.05, 9.0, 0.05, 9.0, 0.05, 0.05] * 3)




@pytest.mark.parametrize("source,measured", [("measured now", True), ("achieved by the host lane on x", False)])
def test_an_auto_plan_counts_the_measured_extra_and_the_guard_watches_it(model_dir, monkeypatch, source, measured):
    """End to end on the CPU, rates handed in (the CPU measures none: copies at 1 MB/s, the host at 1 GB/s, so
    host layers win): beside a measured host rate the plan adds engine.host_extra's measurement to every host
    layer and its table says so; beside an achieved one (which holds that time already) it adds nothing; either
    way generate's guard is armed for the auto lane."""
    import engine.engine as eng_mod
    from engine import lane_guard

    def rate(self, mode):  # what Engine._host_rate sets and returns on a GPU machine
        self.host_weights = eng_mod.weight_forms(self.cfg, self.dtype, self.quant)[0]
        return 1.0, source
    monkeypatch.setattr(eng_mod.Engine, "_host_rate", rate)
    monkeypatch.setattr(eng_mod, "h2d_bandwidth", lambda device: (0.001, "given"))
    monkeypatch.setattr(eng_mod, "auto_host_mode", lambda device, streams: "auto")  # as on a GPU, layers streaming
    eng = _host_engine(model_dir, 1, 0, None, "auto")
    lane, table = eng.plan.host_lane, eng.plan.table()
    assert lane.mode == "auto" and eng.plan.host_layers and lane.stream_step_s > lane.step_s
    assert (lane.host_extra_s > 0) == measured and ("ms a layer" in table) == measured
    per_layer = eng.plan.layer_bytes / 1e9 + lane.host_extra_s
    assert lane.host_s == pytest.approx(len(eng.plan.host_layers) * per_layer, rel=1e-6)
    assert lane_guard.guard_for(eng) is not None
    eng.close()
@pytest.mark.cuda
@pytest.mark.parametrize("how", ["retire", "shrink"])
def test_a_retired_lane_on_the_gpu_leaves_a_decode_graph_without_host_steps(tmp_path_factory, caplog, monkeypatch,
                                                                            how):
    """On the GPU with Triton kernels, a retirement mid-generation captures the decode graph again without its host
    steps (no warm-up: the cache keeps the generation's keys), and the tokens equal the all-resident engine's;
    ``shrink``: first the lane keeps one of its two layers (a graph with that one host step), then retires."""
    import gc

    from engine import lane_guard
    from memory.host_lane import narrow

    import torch

    from engine.engine import Engine, EngineOptions
    from engine.synth.writer import synthesize
    from memory.process_vram import outside_allocator

    model = tmp_path_factory.mktemp("guard_gpu") / "qwen2.5-0.5b"
    synthesize("qwen2.5-0.5b", model, dtype="fp32", seed=0, layers=8, device="cuda")
    base = dict(device="cuda", dtype="fp32", kernels="triton", max_context=256, batch=1)
    prompts = [list(range(100, 140))]
    ref = Engine(model, EngineOptions(**base))
    ref.tokenizer.eos_ids = set()
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=20).token_ids
    half = ref.plan.total_bytes // 2
    ref.close()
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    ours = Engine(model, EngineOptions(**base, vram_budget=half + outside_allocator(torch.device("cuda")).bytes,
                                       host_compute=2))
    ours.tokenizer.eos_ids = set()
    assert any(kind == "host" for kind, _ in ours.graph.steps)
    lane = dataclasses.replace(ours.plan.host_lane, mode="auto", stream_step_s=1e-9)  # any real step loses
    ours.plan = dataclasses.replace(ours.plan, host_lane=lane)
    first = ours.plan.host_layers[0]
    monkeypatch.setattr(lane_guard, "replan", (lambda plan, gbps: narrow(plan, plan.host_layers[:1], gbps))
                        if how == "shrink" else (lambda plan, gbps: None))
    seen, real = [], lane_guard.shrink_host_lane

    def watch(engine, *args):
        guard = real(engine, *args)
        seen.append([what for kind, what in engine.graph.steps if kind == "host"])
        return guard
    monkeypatch.setattr("engine.generate.shrink_host_lane", watch)
    with caplog.at_level(logging.WARNING, logger="engine.lane_guard"):
        got = generate(ours, prompts, SamplingParams(), max_new_tokens=20).token_ids
    assert seen == ([[(first,)], []] if how == "shrink" else [[]])
    assert any("host lane retired" in r.message for r in caplog.records)
    assert ours.model.host is None and ours.graph is not None
    assert not any(kind == "host" for kind, _ in ours.graph.steps)
    assert got == want
    assert generate(ours, prompts, SamplingParams(), max_new_tokens=8).token_ids == [want[0][:8]]
    ours.close()


def test_a_dry_pass_leaves_the_host_lane_out_and_untouched(model_dir, monkeypatch):
    """engine.ahead.dry: compile ahead runs with a host lane too (since session 40); inside, the lane is detached,
    so the dry decode and prefill passes run its layers on the device like the streamed ones, and its KV cache and
    step count stay as they were; after it, the lane is back and the generation equals a fresh engine's."""
    import torch

    from engine import ahead as engine_ahead

    prompts = random_prompts([7], 512, seed=5)
    fresh = _host_engine(model_dir, 1, 0, None, 2)
    want = generate(fresh, prompts, SamplingParams(), max_new_tokens=8).token_ids
    fresh.close()
    eng = _host_engine(model_dir, 1, 0, None, 2)
    host = eng.model.host
    assert host is not None and eng.plan.host_layers
    kv = {i: tuple(t.clone() for t in pair) for i, pair in host.kv.items()}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)  # dry's exit, on the CPU
    with engine_ahead.dry(eng.model):
        assert eng.model.host is None and eng.weights.dry
        eng.model.forward(torch.zeros((1, 1), dtype=torch.long), torch.zeros(1, dtype=torch.int32),
                          torch.ones(1, dtype=torch.int32), eng.cache, eng.cache.max_context)
        eng.model.prefill(torch.zeros((1, 7), dtype=torch.long), [7], 8, eng.cache)
    assert eng.model.host is host and not eng.weights.dry and host.steps == 0
    assert all(torch.equal(a, b) for i, pair in host.kv.items() for a, b in zip(pair, kv[i]))
    assert generate(eng, prompts, SamplingParams(), max_new_tokens=8).token_ids == want
    eng.close()


def test_a_losing_lane_first_shrinks_to_the_layers_that_still_win_then_retires(model_dir, caplog, monkeypatch):
    """engine.lane_guard.shrink_host_lane: the first losing window keeps the host layers the re-plan picks (here the
    first one: memory.host_lane.narrow) and a new guard watches them; its losing window then retires the lane.
    The keys of the layers given back go to the device cache, so the tokens equal the all-resident engine's."""
    from engine import lane_guard
    from memory.host_lane import narrow

    monkeypatch.setattr(lane_guard, "replan", lambda plan, gbps: narrow(plan, plan.host_layers[:1], gbps))
    prompts = random_prompts([5, 9], 512, seed=3)
    ref = make_engine(model_dir, batch=2)
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=24).token_ids
    ref.close()
    ours = _host_engine(model_dir, 2, 0, None, 2)
    first, second = ours.plan.host_layers
    lane = dataclasses.replace(ours.plan.host_lane, mode="auto", stream_step_s=1e-9)  # every window loses
    ours.plan = dataclasses.replace(ours.plan, host_lane=lane)
    shrunk = []
    real = lane_guard.shrink_host_lane

    def watch(engine, *args):
        guard = real(engine, *args)
        shrunk.append((engine.plan.host_layers, engine.weights.plan is engine.plan,
                       engine.model.host.layers if engine.model.host else None))
        return guard
    monkeypatch.setattr("engine.generate.shrink_host_lane", watch)
    with caplog.at_level(logging.WARNING, logger="engine.lane_guard"):
        got = generate(ours, prompts, SamplingParams(), max_new_tokens=24).token_ids
    assert got == want
    assert shrunk[0] == ((first,), True, (first,))  # the plan, the weights' plan and the lane agree
    assert len(shrunk) == 2 and ours.model.host is None  # the smaller lane lost too: retired
    messages = [r.message for r in caplog.records]
    assert any("host lane shrunk" in m for m in messages) and any("host lane retired" in m for m in messages)
    for i in (first, second):  # shrunk, then retired: both stream again, and the plan says so
        module = ours.plan.module(f"layers.{i}")
        assert module.placement == "streamed" and "gave it back" in module.reason
    assert ours.plan.host_lane is None and ours.weights.plan is ours.plan
    assert 2 * (lane_guard.WARM + lane_guard.WINDOW) <= 24
    ours.close()


def test_replan_keeps_fewer_host_layers_as_the_achieved_rate_falls(model_dir):
    """memory.host_lane.replan on a real plan's lane inputs: the layers kept are the plan's own, no more of them at a
    lower rate, none at a rate far below streaming; narrow's plan streams the rest and keeps its step without host
    layers (the guard's reference)."""
    from memory.host_lane import replan

    eng = _host_engine(model_dir, 1, 0, None, 3)
    x = eng.plan.host_lane.inputs  # a tiny model's layers: scaled to 7B-sized ones (466 MB), where the handoffs
    scale = 466_000_000 // max(x.layer_bytes)  # between host and device do not outweigh every layer's time
    big = dataclasses.replace(x, layer_bytes=tuple(b * scale for b in x.layer_bytes), h2d_gbps=55.0)
    plan = dataclasses.replace(eng.plan, host_lane=dataclasses.replace(eng.plan.host_lane, inputs=big))
    kept = []
    for gbps in (1e3, 30.0, 10.0, 3.0, 1.0, 0.3, 1e-4):
        new = replan(plan, gbps)
        kept.append(len(new.host_layers) if new is not None else 0)
        if new is not None:
            assert set(new.host_layers) <= set(plan.host_layers) and new.host_lane.host_gbps == gbps
            assert new.host_lane.stream_step_s == plan.host_lane.stream_step_s
            back = set(plan.host_layers) - set(new.host_layers)
            assert new.streamed_bytes_per_step == plan.streamed_bytes_per_step + sum(
                plan.host_lane.inputs.layer_bytes[i] for i in back)
            assert new.to_dict()["host_lane"].keys() == plan.to_dict()["host_lane"].keys()
            assert "inputs" not in new.to_dict()["host_lane"]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 0
    assert kept[0] == len(plan.host_layers) and any(0 < k < kept[0] for k in kept)  # all, some, then none
    eng.close()


@pytest.mark.cuda
def test_compile_ahead_runs_with_a_host_lane_on_the_gpu(tmp_path_factory, monkeypatch):
    """On the GPU (Triton kernels, tuning picks present): an engine with host layers compiles ahead (its dry passes
    leave the lane out, since session 40) and generates the tokens of one that does not."""
    import gc

    import torch

    from engine.engine import Engine, EngineOptions
    from engine.synth.writer import synthesize
    from kernels import tuning_cache
    from memory.process_vram import outside_allocator

    monkeypatch.setattr(tuning_cache, "has_entries", lambda device: True)
    model = tmp_path_factory.mktemp("ahead_lane") / "qwen2.5-0.5b"
    synthesize("qwen2.5-0.5b", model, dtype="fp32", seed=0, layers=8, device="cuda")
    base = dict(device="cuda", dtype="fp32", kernels="triton", max_context=256, batch=1, first_prompts=(40,))
    probe = Engine(model, EngineOptions(**base))
    half = probe.plan.total_bytes // 2
    probe.close()
    del probe
    gc.collect()
    torch.cuda.empty_cache()
    budget = half + outside_allocator(torch.device("cuda")).bytes
    runs = {}
    for mode in ("0", "threads"):
        monkeypatch.setenv("LAYERSTREAM_COMPILE_AHEAD", mode)
        eng = Engine(model, EngineOptions(**base, vram_budget=budget, host_compute=2))
        eng.tokenizer.eos_ids = set()
        try:
            assert len(eng.plan.host_layers) == 2 and eng.model.host is not None
            assert bool(eng.prefill_shapes) == (mode != "0")  # the first prompt's prefill compiled ahead
            runs[mode] = generate(eng, [list(range(100, 140))], SamplingParams(), max_new_tokens=12).token_ids
            assert eng.model.host.steps >= 11
        finally:
            eng.close()
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    assert runs["0"] == runs["threads"]
