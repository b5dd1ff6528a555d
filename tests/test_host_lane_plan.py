"""The host compute lane in the planner, over plain numbers (no torch, no model).

A 7B-like footprint (28 layers of 466 MB, bf16) at a budget that keeps a third of the layers
resident; the rates are given as numbers (the engine measures them, ``memory.host_rate``).
"""

from __future__ import annotations

import pytest

from memory.footprint import Footprint, Module
from memory.host_lane import LaneInputs, choose_host_layers, improve, lane_times, parse_host_compute, spread_host
from memory.lane_schedule import BOUNDARY_S, HANDOFF_S, StepUnit, simulate
from memory.placement import DISK_RING
from memory.planner import HBM_GBPS, make_plan, minimum_budget

LAYER, N_LAYERS, ROWS, ROW = 466_000_000, 28, 152_064, 7168
KW = dict(host_budget=10**12, max_context=1024, prefill_chunk=512, h2d_gbps=55.0)


def _footprint(layer_sizes: list[int] | None = None) -> Footprint:
    sizes = layer_sizes or [LAYER] * N_LAYERS
    mods = [Module("embed_tokens", "embedding", ROWS * ROW, ROWS * ROW)]
    mods += [Module(f"layers.{i}", "layer", b, b) for i, b in enumerate(sizes)]
    mods += [Module("norm", "norm", ROW, ROW), Module("lm_head", "lm_head", ROWS * ROW, ROWS * ROW)]
    return Footprint(tuple(mods), rows=ROWS, tied=False, kv_bytes_per_token=57_344, act_bytes_per_token=100_000,
                     state_bytes_per_token=14_336, logits_bytes_per_seq=ROWS * 8, rope_bytes_per_position=256,
                     max_positions=32_768, dtype="bfloat16")


def _budget(fp: Footprint, resident_layers: int, head: bool = True) -> int:
    low = minimum_budget(fp, max_context=1024, prefill_chunk=512)
    return low + resident_layers * LAYER + (fp.only("lm_head").bytes if head else 0)


def _units(p, fp: Footprint, host: tuple[int, ...], host_gbps: float, extra: float = 0.0) -> list[StepUnit]:
    """The decode step of plan ``p``'s residency with ``host`` on the CPU (each host layer ``extra`` seconds
    beyond its bytes), written out from the plan's fields."""
    h2d, hbm = 55.0e9, HBM_GBPS * 1e9
    head, norm = fp.only("lm_head").bytes, fp.only("norm").bytes
    units = [StepUnit("host", host_s=LAYER / (host_gbps * 1e9) + extra) if i in host else
             StepUnit("streamed", copy_s=LAYER / h2d, gpu_s=LAYER / hbm) if i in p.streamed_layers else
             StepUnit("resident", gpu_s=LAYER / hbm) for i in range(N_LAYERS)]
    if p.lm_head_resident:
        return units + [StepUnit("resident", gpu_s=(head + norm) / hbm)]
    rows = -(-ROWS // p.lm_head_chunks)
    chunks = [min(rows, ROWS - c * rows) * ROW for c in range(p.lm_head_chunks)]
    return units + [StepUnit("streamed", copy_s=c / h2d, gpu_s=c * (head + norm) / head / hbm) for c in chunks]


def _simulated(p, fp: Footprint, host: tuple[int, ...], host_gbps: float, extra: float = 0.0) -> float:
    """Plan ``p``'s step with ``host`` on the CPU; the embedding row crosses between steps."""
    return simulate(_units(p, fp, host, host_gbps, extra), p.num_slots, boundary_s=BOUNDARY_S + ROW / 55.0e9).step_s


@pytest.mark.parametrize("head", [True, False], ids=["head-resident", "head-streamed"])
@pytest.mark.parametrize("host_gbps", [67.0, 30.0])
@pytest.mark.parametrize("resident", [0, 10])
def test_auto_predicts_the_simulated_step_of_its_layout(host_gbps, resident, head):
    """The prediction is the unit-by-unit step of the chosen layout, no slower than any evenly spread
    count of host layers on the same residency, and faster than streaming everything."""
    fp = _footprint()
    p = make_plan(fp, vram_budget=_budget(fp, resident, head), host_compute="auto", host_gbps=host_gbps, **KW)
    off = make_plan(fp, vram_budget=_budget(fp, resident, head), **KW)
    assert p.host_layers and set(p.host_layers) <= set(p.streamed_layers)
    assert p.predicted_step_s == pytest.approx(_simulated(p, fp, p.host_layers, host_gbps), rel=1e-9)
    assert p.host_lane.step_s == p.predicted_step_s < off.predicted_step_s
    spread = [_simulated(p, fp, spread_host(p.streamed_layers, h), host_gbps)
              for h in range(len(p.streamed_layers) + 1)]
    assert p.predicted_step_s <= min(spread) * (1 + 1e-9)
    lane = p.host_lane
    assert p.predicted_step_s >= max(lane.copy_s, lane.host_s + lane.gpu_s) * (1 - 1e-12)  # lanes wait, not overlap
    assert lane.stream_step_s == pytest.approx(_simulated(p, fp, (), host_gbps), rel=1e-9)  # the guard's yardstick
    assert lane.stream_step_s > p.predicted_step_s
    head_bytes = 0 if p.lm_head_resident else fp.only("lm_head").bytes
    streamed = len([i for i in p.streamed_layers if i not in p.host_layers]) * LAYER + head_bytes
    assert p.streamed_bytes_per_step - streamed == ROW  # and the embedding row
    on_host = [m.name for m in p.modules if m.placement == "host" and m.kind == "layer"]
    assert on_host == [f"layers.{i}" for i in p.host_layers]
    if (p.resident_layers, p.lm_head_resident) != (off.resident_layers, off.lm_head_resident):
        assert any("with the host lane the step is predicted" in n for n in p.notes)


@pytest.mark.parametrize("host_gbps", [67.0, 30.0])
def test_auto_keeps_lm_head_resident_when_that_simulates_faster(host_gbps):
    """Ten resident layers and a streamed lm_head hold the most bytes, but the head's chunks are copied at the
    end of the step, beside no host layer: lm_head resident with seven layers simulates faster."""
    fp = _footprint()
    budget = _budget(fp, 10, head=False)
    p = make_plan(fp, vram_budget=budget, host_compute="auto", host_gbps=host_gbps, **KW)
    off = make_plan(fp, vram_budget=budget, **KW)
    assert not off.lm_head_resident and len(off.resident_layers) == 10
    assert p.lm_head_resident and len(p.resident_layers) == 7 and p.total_bytes + p.outside_bytes <= budget
    kept = [_simulated(off, fp, spread_host(off.streamed_layers, h), host_gbps)
            for h in range(len(off.streamed_layers) + 1)]
    assert p.predicted_step_s < min(kept)
    assert any(n.startswith("7 resident layers with lm_head resident, not 10 with it streamed") for n in p.notes)
    forced = make_plan(fp, vram_budget=budget, host_compute=3, host_gbps=host_gbps, **KW)
    assert forced.resident_layers == off.resident_layers and not forced.lm_head_resident  # N keeps the residency


@pytest.mark.parametrize("extra_ms", [1.0, 3.0, 8.0])
def test_a_host_layer_s_work_beyond_its_projections_counts_in_the_plan(extra_ms):
    """host_extra_s (engine.host_extra: norms, attention, Python) is added to every host layer: the prediction is
    the simulated step of the chosen layout with it, never more host layers than without it, and the table says it."""
    fp, extra = _footprint(), extra_ms / 1e3
    p = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=67.0, host_extra_s=extra, **KW)
    plain = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=67.0, **KW)
    assert p.predicted_step_s == pytest.approx(_simulated(p, fp, p.host_layers, 67.0, extra), rel=1e-9)
    assert p.host_lane.host_s == pytest.approx(len(p.host_layers) * (LAYER / 67e9 + extra), rel=1e-9)
    assert len(p.host_layers) <= len(plain.host_layers) and p.predicted_step_s > plain.predicted_step_s
    assert _simulated(p, fp, plain.host_layers, 67.0, extra) >= p.predicted_step_s * (1 - 1e-9)
    assert f"67.0 GB/s + {extra_ms:.2f} ms a layer" in p.table()
    with pytest.raises(ValueError, match="host_extra_s"):
        make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=67.0, host_extra_s=-1e-3, **KW)


@pytest.mark.parametrize("host_gbps", [0.5, 3.0])  # one layer on the host: >155 ms, above streaming all 18
def test_a_slow_host_lane_gets_no_host_layer(host_gbps):
    fp = _footprint()
    p = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=host_gbps, **KW)
    off = make_plan(fp, vram_budget=_budget(fp, 10), **KW)
    assert p.host_layers == () and p.host_lane is not None
    assert p.predicted_step_s == off.predicted_step_s and p.streamed_bytes_per_step == off.streamed_bytes_per_step
    assert any("no split beats streaming" in n for n in p.notes)


def test_off_reproduces_the_plan_without_a_host_lane():
    fp = _footprint()
    for budget in (_budget(fp, 0, head=False), _budget(fp, 10), None):
        today = make_plan(fp, vram_budget=budget, **KW)
        off = make_plan(fp, vram_budget=budget, host_compute="off", host_gbps=67.0, host_source="measured", **KW)
        assert off == today and off.table() == today.table() and off.to_dict() == today.to_dict()
        assert off.host_lane is None and "host lane" not in off.table()


@pytest.mark.parametrize("n", [1, 4, 9, 18])
def test_n_forces_n_host_layers_interleaved_with_streamed_ones(n):
    fp = _footprint()
    p = make_plan(fp, vram_budget=_budget(fp, 10), host_compute=n, host_gbps=1.0, **KW)
    assert len(p.host_layers) == n and set(p.host_layers) <= set(p.streamed_layers)
    streamed = [i for i in p.streamed_layers if i not in p.host_layers]
    assert len(streamed) == len(p.streamed_layers) - n
    kinds = ["h" if i in p.host_layers else "s" for i in p.streamed_layers]
    if n <= len(p.streamed_layers) // 2:  # never two host layers in a row: a copy runs beside each
        assert "hh" not in "".join(kinds)
    assert f"host lane ({n})" in p.table() and "host time not predicted" not in p.table()


def test_forcing_more_host_layers_than_can_be_is_refused():
    fp = _footprint()
    with pytest.raises(ValueError, match="give at most 18"):
        make_plan(fp, vram_budget=_budget(fp, 10), host_compute=19, host_gbps=67.0, **KW)
    with pytest.raises(ValueError, match="give at most 0"):  # everything resident: nothing can go to the host
        make_plan(fp, host_compute=1, host_gbps=67.0, **KW)


def test_disk_tier_layers_are_never_host_layers():
    fp = _footprint()
    host_budget = (6 + DISK_RING) * LAYER  # only the first six streamed layers are pinned (and the disk tier's ring)
    p = make_plan(fp, vram_budget=_budget(fp, 10), **{**KW, "host_budget": host_budget}, host_compute="auto",
                  host_gbps=200.0)
    assert p.disk_layers and p.host_layers and not set(p.host_layers) & set(p.disk_layers)
    with pytest.raises(ValueError, match="give at most 6"):
        make_plan(fp, vram_budget=_budget(fp, 10), **{**KW, "host_budget": host_budget}, host_compute=7,
                  host_gbps=200.0)


def test_the_host_lanes_kv_cache_takes_no_more_ram_than_is_left():
    """``host_ram``: auto plans no more host layers than that RAM holds the fp32 KV cache of (none when it holds
    not one, saying why), a forced count beyond it is refused with what to lower, and the plan's kv_bytes fit it."""
    fp = _footprint()
    free = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=200.0, **KW)
    per_layer = free.host_lane.kv_bytes // len(free.host_layers)
    assert len(free.host_layers) > 3
    for room in (3, 1):
        p = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=200.0,
                      host_ram=room * per_layer + per_layer // 2, **KW)
        assert len(p.host_layers) == room and p.host_lane.kv_bytes == room * per_layer
        assert p.predicted_step_s < make_plan(fp, vram_budget=_budget(fp, 10), **KW).predicted_step_s
    none = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=200.0,
                     host_ram=per_layer - 1, **KW)
    assert none.host_layers == () and any("KV cache" in n and "--max-context" in n for n in none.notes)
    with pytest.raises(ValueError, match="does not fit the RAM.*give at most 2"):
        make_plan(fp, vram_budget=_budget(fp, 10), host_compute=3, host_gbps=200.0, host_ram=2 * per_layer, **KW)
    assert len(make_plan(fp, vram_budget=_budget(fp, 10), host_compute=2, host_gbps=200.0,
                         host_ram=2 * per_layer, **KW).host_layers) == 2


def test_auto_without_a_measured_rate_uses_no_host_layer():
    fp = _footprint()
    p = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=None, **KW)
    assert p.host_layers == () and any("rate is not known" in n for n in p.notes)
    forced = make_plan(fp, vram_budget=_budget(fp, 10), host_compute=2, host_gbps=None, host_source="x", **KW)
    assert len(forced.host_layers) == 2 and "host time not predicted" in forced.table()


def test_the_plan_table_says_where_each_layer_runs_and_each_lane_s_time():
    fp = _footprint()
    p = make_plan(fp, vram_budget=_budget(fp, 10), host_compute="auto", host_gbps=67.0, host_source="cached", **KW)
    table = p.table()
    lane = p.host_lane
    assert f"layers {', '.join(map(str, p.host_layers))};" in table
    assert f"copy {lane.copy_s * 1e3:.1f} ms" in table and f"host {lane.host_s * 1e3:.1f} ms (67.0 GB/s, cached)" \
        in table and f"GPU {lane.gpu_s * 1e3:.1f} ms" in table
    assert "computed on the CPU" in table
    assert lane.kv_bytes == len(p.host_layers) * (fp.kv_bytes_per_token // N_LAYERS) * 1024 * 2  # fp32 of bf16
    assert tuple(p.to_dict()["host_lane"]["layers"]) == p.host_layers


@pytest.mark.parametrize("n,h", [(1, 1), (5, 2), (18, 9), (18, 17), (7, 0), (3, 3)])
def test_spread_host_is_even_and_in_order(n, h):
    cands = tuple(range(100, 100 + 2 * n, 2))
    got = spread_host(cands, h)
    assert len(got) == h == len(set(got)) and list(got) == sorted(got) and set(got) <= set(cands)
    gaps = [cands.index(b) - cands.index(a) for a, b in zip(got, got[1:])]
    assert not gaps or max(gaps) - min(gaps) <= 1


def test_lane_times_follow_the_chain():
    """Layer 0 streamed (100 s to copy and 100 s to compute at 1 byte/s), layer 1 resident (200), layer 2 on the
    host (150), the head's 10 on the GPU, 50 bytes of embedding rows between steps: the next step's first copy
    runs during the chain, so a step is the chain plus the rows, the boundary and one handoff."""
    x = LaneInputs(candidates=(0, 2), layer_bytes=(100, 200, 300), copy_other=50, streamed=(0, 2), gpu_other=10,
                   h2d_gbps=1e-9, hbm_gbps=1e-9, host_gbps=2e-9)
    t = lane_times(x, (2,))
    assert (t.copy_s, t.host_s, t.gpu_s) == pytest.approx((100.0, 150.0, 310.0))
    assert t.step_s == pytest.approx(100 + 200 + 150 + 10 + 50 + BOUNDARY_S + HANDOFF_S, rel=1e-12)


@pytest.mark.parametrize("host_gbps", [30.0, 45.0, 67.0])
def test_moving_host_layers_never_lengthens_the_step(host_gbps):
    """From every spread count, the moves keep the count, stay among the candidates and never make the
    simulated step longer; on this 7B-like plan (8 resident layers, lm_head in 3 streamed chunks) some
    count gets strictly shorter, and auto is no slower than any spread count."""
    streamed = tuple(i for i in range(N_LAYERS) if i % 7 not in (3, 6))[:20]
    x = LaneInputs(candidates=streamed, layer_bytes=(LAYER,) * N_LAYERS, copy_other=ROW, streamed=streamed,
                   gpu_other=ROWS * ROW + ROW, h2d_gbps=55.0, hbm_gbps=HBM_GBPS, host_gbps=host_gbps,
                   head_chunks=(ROWS * ROW // 3,) * 3, slots=2)
    gained = []
    for h in range(1, len(streamed) + 1):
        start = spread_host(streamed, h)
        before = lane_times(x, start)
        moved, after = improve(x, start, before)
        assert len(moved) == h and list(moved) == sorted(set(moved)) and set(moved) <= set(streamed)
        assert after.step_s <= before.step_s and after == lane_times(x, moved)
        gained.append(before.step_s - after.step_s)
    assert max(gained) > 1e-3  # at least a millisecond somewhere
    best = choose_host_layers(x, "auto")
    assert best.times.step_s <= min(lane_times(x, spread_host(streamed, h)).step_s for h in range(len(streamed) + 1))


@pytest.mark.parametrize("text,want", [("auto", "auto"), ("OFF", "off"), (" 3 ", 3), ("0", 0), (5, 5)])
def test_parse_host_compute(text, want):
    assert parse_host_compute(text) == want


@pytest.mark.parametrize("text", ["", "on", "-1", "2.5", "x3", -2])
def test_parse_host_compute_rejects(text):
    with pytest.raises(ValueError, match="must be auto, off or a number of layers"):
        parse_host_compute(text)
