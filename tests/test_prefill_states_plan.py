"""Where the planner puts a layer-major prefill's prompt states (``memory.prefill_states``): VRAM, or host
memory when in VRAM they would not fit or would cost prefill chunk size (``auto``), or when asked; over
plain numbers."""

from __future__ import annotations

import pytest

from memory.footprint import Footprint, Module
from memory.planner import make_plan, minimum_budget

LAYER, N, SPT, CHUNK = 10_000, 6, 50, 256  # layer bytes, layers, state bytes per prompt token, prefill chunk


def _footprint() -> Footprint:
    rows, row = 1000, 64
    mods = [Module("embed_tokens", "embedding", rows * row, rows * row)]
    mods += [Module(f"layers.{i}", "layer", LAYER, LAYER) for i in range(N)]
    mods += [Module("norm", "norm", row, row), Module("lm_head", "lm_head", rows * row, rows * row)]
    return Footprint(tuple(mods), rows=rows, tied=False, kv_bytes_per_token=100, act_bytes_per_token=1_000,
                     state_bytes_per_token=SPT, logits_bytes_per_seq=8000, rope_bytes_per_position=16,
                     max_positions=4096, dtype="bfloat16")


def _plans(budget: int, **kw):
    base = dict(host_budget=10**9, max_context=2048, prefill_chunk=CHUNK, vram_budget=budget)
    return {mode: make_plan(_footprint(), **{**base, **kw, "prefill_states": mode})
            for mode in ("auto", "vram", "host")}


def test_state_sizes_in_vram_and_on_the_host():
    fp = _footprint()
    assert fp.prefill_state_bytes(2, 2048, CHUNK) == (2 * 2047 - CHUNK) * SPT
    assert fp.prefill_state_bytes(2, 2048, CHUNK, on_host=True) == 2 * CHUNK * SPT  # one chunk in, one out
    # a prompt of two chunks, the second short: two chunk-sized staging buffers all the same (more than in VRAM)
    assert fp.prefill_state_bytes(1, 300, CHUNK, on_host=True) == 2 * CHUNK * SPT
    assert fp.prefill_state_bytes(1, 300, CHUNK) == (299 - CHUNK) * SPT < 2 * CHUNK * SPT
    assert fp.prefill_state_bytes(1, 64, CHUNK, on_host=True) == fp.prefill_state_bytes(1, 64, CHUNK) == 0
    assert fp.prefill_state_host_bytes(3, 2048) == 3 * 2048 * SPT


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("extra_layers", [0, 2])
def test_host_states_keep_more_layers_resident_but_auto_stays_in_vram(batch, extra_layers):
    fp = _footprint()
    budget = minimum_budget(fp, batch=batch, max_context=2048, prefill_chunk=CHUNK) + extra_layers * LAYER
    p = _plans(budget, batch=batch)
    saved = fp.prefill_state_bytes(batch, 2048, CHUNK) - fp.prefill_state_bytes(batch, 2048, CHUNK, True)
    assert saved >= LAYER  # what the host placement frees on the GPU buys at least one more resident layer
    assert len(p["vram"].resident_layers) == extra_layers
    assert p["host"].resident_weight_bytes >= p["vram"].resident_weight_bytes + LAYER
    assert p["auto"] == p["vram"]  # resident bytes alone do not move the states (memory.prefill_states)
    assert p["host"].workspace_bytes == p["vram"].workspace_bytes - saved
    assert p["host"].prefill_state_bytes == 2 * CHUNK * SPT
    pinned = sum(m.bytes for m in p["host"].modules if m.tier == "pinned")
    assert p["host"].prefill_state_host_bytes == batch * 2048 * SPT == p["host"].host_pinned_bytes - pinned
    assert p["vram"].prefill_state_place == "vram" and p["vram"].prefill_state_host_bytes == 0
    assert not any(n.startswith("prompt states") for n in p["auto"].notes)
    assert "in pinned host memory between layers" in p["host"].table()
    assert "wait in VRAM between layers" in p["vram"].table()
    assert p["host"].to_dict()["prefill_state_place"] == "host"


@pytest.mark.parametrize("context", [64, 200])
def test_states_stay_in_vram_when_that_costs_nothing(context):
    fp = _footprint()
    low = minimum_budget(fp, max_context=context, prefill_chunk=CHUNK)
    for budget in (low, low + 3 * LAYER, 10**9):  # short prompts keep (almost) nothing between layers
        p = _plans(budget, max_context=context)
        assert p["auto"].prefill_state_place == "vram" and p["auto"] == p["vram"]
        assert not any(n.startswith("prompt states") for n in p["auto"].notes)
    everything = _plans(10**9)  # the whole model and the long prompt's states fit: nothing to gain on the host
    assert everything["auto"].prefill_state_place == "vram" and not everything["auto"].streamed_layers


def test_below_the_in_vram_minimum_only_host_states_run():
    fp = _footprint()
    low_host = minimum_budget(fp, max_context=2048, prefill_chunk=CHUNK, host_states=True)
    assert low_host < minimum_budget(fp, max_context=2048, prefill_chunk=CHUNK)
    with pytest.raises(ValueError, match="below the minimum"):
        _plans(low_host)
    p = make_plan(fp, vram_budget=low_host, host_budget=10**9, max_context=2048, prefill_chunk=CHUNK)
    assert p.prefill_state_place == "host" and p.total_bytes <= p.budget_bytes
    assert any("in VRAM they would not fit the budget" in n for n in p.notes)
    with pytest.raises(ValueError, match="below the minimum"):
        make_plan(fp, vram_budget=low_host - 1, host_budget=10**9, max_context=2048, prefill_chunk=CHUNK)


def test_host_states_keep_a_larger_automatic_chunk():
    fp = _footprint()
    budget = minimum_budget(fp, max_context=4096, prefill_chunk=1024, host_states=True)
    kw = dict(vram_budget=budget, host_budget=10**9, max_context=4096, prefill_chunk=1024, auto_chunk=True)
    vram = make_plan(fp, **kw, prefill_states="vram")
    auto = make_plan(fp, **kw)
    assert vram.prefill_chunk < 1024 and any("prefill chunk" in n for n in vram.notes)
    assert auto.prefill_state_place == "host" and auto.prefill_chunk == 1024
    assert not any(n.startswith("prefill chunk") for n in auto.notes)
    assert any(f"need a prefill chunk of {vram.prefill_chunk} tokens instead of 1024" in n for n in auto.notes)


def test_host_memory_for_the_states_comes_off_the_pinned_layers():
    fp = _footprint()
    budget = minimum_budget(fp, max_context=2048, prefill_chunk=CHUNK)
    pins = _plans(budget)["vram"].host_pinned_bytes  # what the in-VRAM plan pins: every streamed module
    p = _plans(budget, host_budget=pins)  # the host plan needs those pins less its extra resident layers + states
    assert p["vram"].disk_bytes_per_step == 0 < p["host"].disk_bytes_per_step
    assert p["host"].resident_weight_bytes > p["vram"].resident_weight_bytes
    assert p["auto"].prefill_state_place == "vram"
    states = fp.prefill_state_host_bytes(1, 2048)
    with pytest.raises(ValueError, match="raise --host-budget or use --prefill-states vram"):
        _plans(budget, host_budget=states - 1)
    with pytest.raises(ValueError, match="prefill_states must be one of auto, vram, host"):
        make_plan(fp, prefill_states="gpu")
