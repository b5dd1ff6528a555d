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
        make_plan(fp, vram_budget=low - 1, **kw)


def test_long_prompt_states_are_planned():
    fp = _plain_footprint([10_000] * 4)
    # batch 2 at context 65: 2 x 64 prompt positions, minus the chunk of 16 being computed, keep 4 bytes each
    assert fp.prefill_state_bytes(2, 65, 16) == (2 * 64 - 16) * 4
    assert fp.prefill_state_bytes(1, 16, 16) == 0  # a prompt that fits one chunk keeps nothing extra
    p = make_plan(fp, host_budget=10**9, batch=2, max_context=65, prefill_chunk=16)
    assert p.prefill_state_bytes == (2 * 64 - 16) * 4
    assert p.workspace_bytes == fp.workspace_bytes(2, 65, 16) and p.prefill_state_bytes < p.workspace_bytes
