"""The decode step simulated unit by unit (memory/lane_schedule.py), against schedules worked out by hand."""

from __future__ import annotations

import pytest

from memory.lane_schedule import StepUnit, simulate

S = StepUnit("streamed", copy_s=2.0, gpu_s=1.0)
H = StepUnit("host", host_s=3.0)
R = StepUnit("resident", gpu_s=0.5)


@pytest.mark.parametrize("slots,step", [(1, 7.0), (2, 5.0), (3, 5.0)])
def test_a_host_layer_between_two_streamed_ones(slots, step):
    """S H S. One slot: the second copy waits for the first layer's compute (free at 3), lands at 5, and the
    next step's first copy waits for that layer (7): a step is 7. Two slots: the copies run ahead and the
    chain (1 + 3 + 1) sets the pace: 5, where one slot more changes nothing."""
    t = simulate([S, H, S], slots, handoff_s=0.0, boundary_s=0.0, steps=6)
    assert t.step_s == pytest.approx(step)
    assert (t.copy_busy_s, t.host_busy_s, t.gpu_busy_s) == pytest.approx((4.0, 3.0, 2.0))


def test_copies_bound_the_step_when_the_chain_is_short():
    """Three streamed units of copy 2 and compute 0.1 each, two slots: the copy engine is never idle, 6 a step."""
    s = StepUnit("streamed", copy_s=2.0, gpu_s=0.1)
    assert simulate([s, s, s], 2, handoff_s=0.0, boundary_s=0.0).step_s == pytest.approx(6.0)


def test_host_layers_ahead_of_a_streamed_tail_hide_its_copies():
    """H H S S (host layers, then two streamed chunks, like a streamed lm_head): the tail's copies run during
    the host layers, so the step is the chain: 3 + 3 + 1 + 1 + one handoff 0.25 + the boundary 0.5."""
    t = simulate([H, H, S, S], 2, handoff_s=0.25, boundary_s=0.5, steps=5)
    assert t.step_s == pytest.approx(8.75)


def test_one_slot_makes_copy_and_compute_alternate():
    """R S S S with one slot: each copy waits for the previous unit's compute, so a step is 3 x (2 + 1); the
    resident layer's 0.5 hides behind the first copy, which starts when the last unit's compute frees the slot."""
    t = simulate([R, S, S, S], 1, handoff_s=0.0, boundary_s=0.0, steps=5)
    assert t.step_s == pytest.approx(9.0)


def test_one_handoff_per_run_of_host_layers():
    """H H R H: two runs of host layers, two handoffs of 0.1 each; nothing streams."""
    t = simulate([H, H, R, H], 0, handoff_s=0.1, boundary_s=0.0)
    assert t.step_s == pytest.approx(9.0 + 0.5 + 0.2)


@pytest.mark.parametrize("slots,steps,match", [(0, 3, "at least one staging slot"), (2, 1, "at least 2 steps")])
def test_bad_arguments_are_refused(slots, steps, match):
    with pytest.raises(ValueError, match=match):
        simulate([S, H], slots, steps=steps)
