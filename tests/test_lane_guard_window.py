"""engine.lane_guard: what the guard judges a lane by (CPU). The re-plan takes the rate of the window that lost, not
the lane's average since it began; and no guard is armed where the plan's step cannot stand for the steps."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.generate import generate
from engine.sampling import SamplingParams
from tests.helpers import make_hf_model, random_prompts
from tests.test_host_lane import _host_engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    _, d = make_hf_model("qwen2", tmp_path_factory.mktemp("lane_window"), tokenizer_dir=tokenizer_dir)
    return d


def test_the_guard_counts_the_lanes_steps_and_seconds_over_the_window_it_judges():
    from engine.lane_guard import WARM, WINDOW, LaneGuard

    host = SimpleNamespace(steps=100, seconds=50.0)  # an earlier generation's counts: not this window's
    g = LaneGuard(0.1, host)
    for k in range(WARM + WINDOW):
        if k >= WARM:  # a window step: the lane's trip takes 0.3 s of the step
            host.steps, host.seconds = host.steps + 1, host.seconds + 0.3
        fired = g.observe(0.5)
    assert fired and g.window() == (WINDOW, pytest.approx(0.3 * WINDOW))
    quiet = LaneGuard(0.1)  # no lane given: nothing counted, the caller falls back to the lane's own counts
    assert any(quiet.observe(0.5) for _ in range(WARM + WINDOW)) and quiet.window() is None


def test_a_lane_that_slows_down_is_replanned_at_its_slow_rate_not_its_average(model_dir, monkeypatch):
    """A first generation with a fast lane, then one where each host trip takes 20 ms more (another tenant's
    memory traffic): the re-plan gets the slow generation's window rate, several times below the lane's average over
    both generations (what it got before), and the next plan keeps that rate too."""
    from engine import lane_guard
    from engine.host_lane import HostLane

    eng = _host_engine(model_dir, 1, 0, None, 2)

    def auto(stream_step_s):
        lane = dataclasses.replace(eng.plan.host_lane, mode="auto", stream_step_s=stream_step_s)
        eng.plan = eng.weights.plan = dataclasses.replace(eng.plan, host_lane=lane)

    prompts = random_prompts([4], 512, seed=1)
    auto(1e9)  # the lane wins: no window fires
    generate(eng, prompts, SamplingParams(), max_new_tokens=40)
    fast = lane_guard.achieved_gbps(eng, plan_bytes=True)
    real = HostLane._compute

    def slow(self, *a, **k):
        out = real(self, *a, **k)
        time.sleep(0.02)
        self.seconds += 0.02
        return out
    monkeypatch.setattr(HostLane, "_compute", slow)
    seen, kept = [], []  # (the rate the re-plan got, the lane's average then); the rates kept for the next plan
    monkeypatch.setattr(lane_guard, "replan", lambda plan, gbps: seen.append(
        (gbps, lane_guard.achieved_gbps(eng, plan_bytes=True))))  # None: the lane is retired
    monkeypatch.setattr(lane_guard, "record_achieved", lambda *a: kept.append(a[-2]))
    auto(1e-9)  # every window loses
    generate(eng, prompts, SamplingParams(), max_new_tokens=lane_guard.WARM + lane_guard.WINDOW + 4)
    assert len(seen) == 1 and eng.model.host is None
    (window, average), = seen
    assert window < average / 3 and window < fast / 3  # the slow window's rate, not the average over both
    assert kept == [pytest.approx(window)]  # what the next plan is given (the worker's bytes: the plan's here)
    eng.close()


@pytest.mark.parametrize("case", ["disk", "eager on a GPU"])
def test_no_guard_where_the_plans_step_cannot_stand_for_the_steps(case):
    """A plan that reads layers from disk (its step without host layers counts them at the H2D rate and no disk
    read, so every window would lose and the re-plan would retire a winning lane), or decode steps without a CUDA
    graph on a GPU (launches the plan leaves out): no guard. The same engine with neither gets one."""
    from engine.lane_guard import LaneGuard, guard_for

    lane = SimpleNamespace(mode="auto", stream_step_s=0.2)
    plan = SimpleNamespace(host_lane=lane, disk_layers=(5,) if case == "disk" else ())
    engine = SimpleNamespace(plan=plan, model=SimpleNamespace(host=object()),
                             device=SimpleNamespace(type="cuda"), graph=None if case != "disk" else object())
    assert guard_for(engine) is None
    plan.disk_layers, engine.graph = (), object()
    assert isinstance(guard_for(engine), LaneGuard)


def test_a_ctrl_c_during_a_shrink_lands_after_it(model_dir, monkeypatch):
    """A Ctrl-C while the lane shrinks (keys moving to the device cache, the plan and graph changing) is raised once
    they agree again: the generation ends interrupted, the lane, the plan and the weights' plan say the same, and
    the next generation's tokens equal a fresh engine's."""
    import os
    import signal

    from engine import lane_guard
    from memory.host_lane import narrow

    prompts = random_prompts([6], 512, seed=4)
    fresh = _host_engine(model_dir, 1, 0, None, 2)
    want = generate(fresh, prompts, SamplingParams(), max_new_tokens=8).token_ids
    fresh.close()
    eng = _host_engine(model_dir, 1, 0, None, 2)
    first = eng.plan.host_layers[0]
    lane = dataclasses.replace(eng.plan.host_lane, mode="auto", stream_step_s=1e-9)
    eng.plan = eng.weights.plan = dataclasses.replace(eng.plan, host_lane=lane)
    monkeypatch.setattr(lane_guard, "replan", lambda plan, gbps: narrow(plan, plan.host_layers[:1], gbps))
    real = lane_guard._to_device_cache

    def interrupted(engine, layers):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C mid-shrink
        real(engine, layers)
    monkeypatch.setattr(lane_guard, "_to_device_cache", interrupted)
    out = generate(eng, prompts, SamplingParams(), max_new_tokens=lane_guard.WARM + lane_guard.WINDOW + 6)
    assert out.finish_reasons == ["interrupted"]
    assert eng.model.host.layers == (first,) == eng.plan.host_layers and eng.weights.plan is eng.plan
    monkeypatch.setattr(lane_guard, "_to_device_cache", real)
    assert generate(eng, prompts, SamplingParams(), max_new_tokens=8).token_ids == want
    eng.close()
