"""The planner over plain numbers: a hand-made ``memory.footprint.Footprint``, no model config or tensor names."""

from __future__ import annotations

import pytest

from memory.footprint import Footprint, Module
from memory.planner import make_plan, minimum_budget


def _plain_footprint(layer_sizes: list[int], tied: bool = False) -> Footprint:
    rows, row = 1000, 64
    mods = [Module("embed_tokens", "embedding", rows * row, rows * row // 2)]
    mods += [Module(f"layers.{i}", "layer", b, b // 2) for i, b in enumerate(layer_sizes)]
    mods += [Module("norm", "norm", row, row // 2), Module("lm_head", "lm_head", rows * row, rows * row // 2)]
    return Footprint(tuple(mods), rows=rows, tied=tied, kv_bytes_per_token=100, act_bytes_per_token=10,
                     state_bytes_per_token=4, logits_bytes_per_seq=8000, rope_bytes_per_position=16,
                     max_positions=128, dtype="bfloat16")


@pytest.mark.parametrize("tied", [False, True])
def test_planner_over_plain_numbers_with_unequal_layers(tied):
    sizes = [10_000, 12_000, 9_000, 12_000, 11_000, 10_000]  # e.g. a GGUF file mixing block types per layer
    fp = _plain_footprint(sizes, tied)
    kw = dict(host_budget=10**9, max_context=64, prefill_chunk=16)
    low = minimum_budget(fp, max_context=64, prefill_chunk=16)
    fixed = fp.kv_bytes(1, 64) + fp.workspace_bytes(1, 64, 16) + fp.only("norm").bytes
    assert low == fixed + 2 * max(sizes)  # two slots of the largest layer
    p = make_plan(fp, vram_budget=low + 2 * max(sizes), **kw)
    assert p.slot_bytes == p.layer_bytes == max(sizes)
    assert len(p.resident_layers) == 2 and not p.lm_head_resident
    assert p.streamed_bytes_per_step == sum(sizes[i] for i in p.streamed_layers) + fp.only("lm_head").bytes + 64
    assert p.total_bytes <= p.budget_bytes
    assert [m.bytes for m in p.modules if m.kind == "layer"] == sizes
    # disk reads are counted in file bytes
    q = make_plan(fp, vram_budget=low, **{**kw, "host_budget": 0})
    assert q.disk_bytes_per_step == sum(sizes) // 2 + fp.only("lm_head").file_bytes
    with pytest.raises(ValueError, match="below the minimum"):
        make_plan(fp, vram_budget=low - 1, prefill_states="vram", **kw)
    assert make_plan(fp, vram_budget=low - 1, **kw).prefill_state_place == "host"  # auto: the states move out


def test_long_prompt_states_are_planned():
    fp = _plain_footprint([10_000] * 4)
    # batch 2 at context 65: 2 x 64 prompt positions, minus the chunk of 16 being computed, keep 4 bytes each
    assert fp.prefill_state_bytes(2, 65, 16) == (2 * 64 - 16) * 4
    assert fp.prefill_state_bytes(1, 16, 16) == 0  # a prompt that fits one chunk keeps nothing extra
    p = make_plan(fp, host_budget=10**9, batch=2, max_context=65, prefill_chunk=16)
    assert p.prefill_state_bytes == (2 * 64 - 16) * 4
    assert p.workspace_bytes == fp.workspace_bytes(2, 65, 16) and p.prefill_state_bytes < p.workspace_bytes


def test_memory_outside_the_allocator_comes_off_a_given_budget():
    fp = _plain_footprint([10_000] * 6)
    kw = dict(host_budget=10**9, max_context=64, prefill_chunk=16)
    low = minimum_budget(fp, max_context=64, prefill_chunk=16)
    budget = low + 3 * 10_000
    plain = make_plan(fp, vram_budget=budget, **kw)
    ctx = make_plan(fp, vram_budget=budget, outside_bytes=20_000, **kw)
    assert ctx.outside_bytes == 20_000 and ctx.allocator_bytes == budget - 20_000
    assert len(ctx.resident_layers) == len(plain.resident_layers) - 2  # two layers' worth went to the context
    assert ctx.total_bytes + ctx.outside_bytes <= ctx.budget_bytes
    assert any("CUDA context and kernels" in line for line in ctx.summary_lines())
    with pytest.raises(ValueError, match="for the CUDA context and kernels"):
        make_plan(fp, vram_budget=low + 100, outside_bytes=200, **kw)
    # the GPU's free memory is measured with the context already there: nothing more comes off it
    free = make_plan(fp, device_free=budget, outside_bytes=20_000, **kw)
    assert free.outside_bytes == 0 and free.budget_bytes == budget


def _chunky_footprint() -> Footprint:
    """Activations of a prefill token far above what it keeps between layers, as in a real model."""
    fp = _plain_footprint([10_000] * 6)
    return Footprint(fp.modules, rows=fp.rows, tied=False, kv_bytes_per_token=100, act_bytes_per_token=1_000,
                     state_bytes_per_token=50, logits_bytes_per_seq=8000, rope_bytes_per_position=16,
                     max_positions=4096, dtype="bfloat16")


@pytest.mark.parametrize("batch", [1, 3])
def test_an_unchosen_prefill_chunk_shrinks_to_fit_the_budget(batch):
    fp = _chunky_footprint()
    kw = dict(host_budget=10**9, batch=batch, max_context=2048, prefill_states="vram")  # host states: test_prefill_states
    need = {c: minimum_budget(fp, batch=batch, max_context=2048, prefill_chunk=c) for c in (1024, 512, 256, 128, 64)}
    assert need[1024] > need[512] > need[256] > need[128] > need[64]  # smaller chunks need less, states grow
    budget = need[256] + 5_000  # fits a 256-token chunk, not 512
    with pytest.raises(ValueError, match="below the minimum"):
        make_plan(fp, vram_budget=budget, prefill_chunk=1024, **kw)  # a chunk the user chose is kept
    p = make_plan(fp, vram_budget=budget, prefill_chunk=1024, auto_chunk=True, **kw)
    assert p.prefill_chunk == 256 and p.total_bytes <= p.budget_bytes
    assert p.prefill_state_bytes == fp.prefill_state_bytes(batch, 2048, 256)
    assert p.workspace_bytes == fp.workspace_bytes(batch, 2048, 256)
    assert any("prefill chunk 256 tokens, not 1024" in n for n in p.notes)
    table = p.table()
    assert "one 256-token prefill chunk's activations" in table
    assert "prompt states    : " in table and f"up to {batch} x 2047 prompt tokens" in table
    # a budget that fits the asked chunk leaves it alone, without a note
    q = make_plan(fp, vram_budget=need[1024], prefill_chunk=1024, auto_chunk=True, **kw)
    assert q.prefill_chunk == 1024 and not any("prefill chunk" in n for n in q.notes)
    # below what even the smallest automatic chunk needs: the usual error
    with pytest.raises(ValueError, match="below the minimum"):
        make_plan(fp, vram_budget=need[64] - 1, prefill_chunk=1024, auto_chunk=True, **kw)
