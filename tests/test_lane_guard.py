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
    ours.plan = dataclasses.replace(ours.plan, host_lane=lane)
    with caplog.at_level(logging.WARNING, logger="engine.lane_guard"):
        got = generate(ours, prompts, SamplingParams(), max_new_tokens=16).token_ids
    assert got == want
    assert (ours.model.host is None) == retired
    assert any("host lane retired" in r.message for r in caplog.records) == retired
    if retired:  # the next generation streams every layer from the start
        assert generate(ours, prompts, SamplingParams(), max_new_tokens=6).token_ids == [w[:6] for w in want]
    assert lane_guard.WARM + lane_guard.WINDOW < 16
    ours.close()


def test_the_guard_decides_once_on_the_median_after_its_warm_up():
    from engine.lane_guard import WARM, WINDOW, LaneGuard

    g = LaneGuard(0.1)  # limit 0.11 s
    slow = [5.0] * WARM + [0.12] * (WINDOW // 2) + [0.05] * (WINDOW - WINDOW // 2 - 1)
    assert not any(g.observe(s) for s in slow)  # warm-up steps never count; one step short of the window
    assert g.observe(0.12) and g.measured == pytest.approx(0.12)  # median of 0.12 x 4, 0.05 x 2 over 0.11
    assert not g.observe(9.0)  # decided: never again
    fast = LaneGuard(0.1)
    assert not any(fast.observe(s) for s in [5.0] * WARM + [0.105] * WINDOW)
