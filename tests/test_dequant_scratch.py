"""The prefill's dense tile of packed layers (engine.quant.ggml.dequant_scratch): its default, the
LAYERSTREAM_DEQUANT_SCRATCH override, bad values refused, the planner growing it into spare VRAM (never at a
resident layer's cost), and the plan and the ops using one size."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.footprint import footprint, widest_projection
from engine.quant.checkpoint import layer_quant, read_quantization
from engine.quant.ggml import DEQUANT_SCRATCH, dequant_scratch, dequant_scratch_range
from engine.synth.presets import PRESETS
from engine.synth.writer import synthesize
from memory.footprint import Footprint, Module
from memory.planner import make_plan

ENV = "LAYERSTREAM_DEQUANT_SCRATCH"


@pytest.mark.parametrize("text, want", [(None, DEQUANT_SCRATCH), ("", DEQUANT_SCRATCH), ("256MiB", 256 << 20),
                                        ("0.5GiB", 512 << 20), ("262144", 262144), ("64KiB", 65536)])
def test_default_and_override(monkeypatch: pytest.MonkeyPatch, text: str | None, want: int) -> None:
    if text is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, text)
    assert dequant_scratch() == want


@pytest.mark.parametrize("text, match", [("abc", "cannot parse"), ("6XB", "unknown unit"), ("-5MiB", "negative"),
                                         ("1KiB", "below 64KiB"), ("0", "below 64KiB")])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, text: str, match: str) -> None:
    monkeypatch.setenv(ENV, text)
    with pytest.raises(ValueError, match=f"{ENV}.*{match}"):
        dequant_scratch()


def test_plan_and_ops_use_one_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.ops_triton import TritonOps
    d = synthesize("tiny-qwen2", tmp_path / "awq", quant="awq")
    cfg, ckpt = ModelConfig.from_file(d / "config.json"), Checkpoint(d)
    quant = layer_quant(ckpt, cfg, read_quantization(d))
    sizes = {n: i.nbytes for n, i in ckpt.tensors.items()}
    work = {}
    for text, want in ((None, DEQUANT_SCRATCH), ("3MiB", 3 << 20)):
        if text is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, text)
        fp = footprint(cfg, torch.float16, sizes, quant)
        assert fp.scratch_bytes == want and TritonOps()._scratch == want
        assert footprint(cfg, torch.float16).scratch_bytes == 0  # nothing packed: no tile
        work[want] = fp.workspace_bytes(1, 256, 128)
    assert work[DEQUANT_SCRATCH] - work[3 << 20] == DEQUANT_SCRATCH - (3 << 20)


def test_cli_names_a_bad_value_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """engine.run on a packed model: one error line naming the variable, not a dtype note built from it."""
    from engine.run import main
    d = synthesize("tiny-qwen2", tmp_path / "awq", quant="awq")
    monkeypatch.setenv(ENV, "lots")
    assert main(["--model", str(d), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ENV}: cannot parse size 'lots'") and "note:" not in err and "Traceback" not in err


MiB = 1 << 20


def _tiled_footprint(most: int, layers: int = 8) -> Footprint:
    """Packed-layer sizes on a MiB scale, a 64 MiB tile that may grow to ``most``."""
    rows, row = 1000, 64
    mods = [Module("embed_tokens", "embedding", rows * row, rows * row)]
    mods += [Module(f"layers.{i}", "layer", 100 * MiB, 100 * MiB) for i in range(layers)]
    mods += [Module("norm", "norm", row, row), Module("lm_head", "lm_head", rows * row, rows * row)]
    return Footprint(tuple(mods), rows=rows, tied=False, kv_bytes_per_token=100, act_bytes_per_token=10,
                     state_bytes_per_token=4, logits_bytes_per_seq=8000, rope_bytes_per_position=16,
                     max_positions=128, dtype="float16, awq", scratch_bytes=64 * MiB, scratch_max_bytes=most)


@pytest.mark.parametrize("spare_mib, want_mib", [(0, 64), (64.5, 64), (164.7, 164), (260, 260), (4000, 260)])
def test_tile_grows_into_vram_no_module_needs(spare_mib: float, want_mib: int) -> None:
    """All resident with a 64 MiB tile and ``spare_mib`` over: the tile takes the spare past one allocator
    allowance (64 MiB, left free), in whole MiB, up to its most useful size, and nothing else changes."""
    kw = dict(host_budget=1 << 40, max_context=64, prefill_chunk=16)
    fixed = make_plan(_tiled_footprint(64 * MiB), vram_budget=1 << 40, **kw)  # no room to grow: 64 MiB
    budget = fixed.total_bytes + int(spare_mib * MiB)
    p = make_plan(_tiled_footprint(260 * MiB), vram_budget=budget, **kw)
    assert p.scratch_bytes == want_mib * MiB and not p.streamed_layers and p.total_bytes <= budget
    assert p.workspace_bytes - fixed.workspace_bytes == p.scratch_bytes - 64 * MiB  # the plan holds the tile
    assert "dense tile of packed layers" in "\n".join(p.summary_lines())


def test_the_plan_holds_the_tile_alone() -> None:
    """The tiles' GEMMs write their columns of the output in place (kernels.qlinear.tiled_linear): the workspace
    holds the tile and nothing a token besides the activations."""
    small, big = _tiled_footprint(64 * MiB), dataclasses.replace(_tiled_footprint(64 * MiB), scratch_bytes=96 * MiB)
    assert big.workspace_bytes(1, 64, 16) - small.workspace_bytes(1, 64, 16) == 32 * MiB
    assert big.workspace_bytes(1, 64, 4096) - small.workspace_bytes(1, 64, 4096) == 32 * MiB
    p = make_plan(small, vram_budget=1 << 40, host_budget=1 << 40, max_context=64, prefill_chunk=16)
    assert p.workspace_bytes == small.workspace_bytes(1, 64, 16)


def test_a_tiny_packed_model_keeps_its_prefill_chunk(tmp_path: Path) -> None:
    """The tiny AWQ model at 1 GiB plans its 2048-token chunk (a 64 MiB tile's GEMM over rows of 64 elements
    counted as 64 MiB / 64 a token once asked for 2 GiB and halved the chunk)."""
    d = synthesize("tiny-qwen2", tmp_path / "awq", quant="awq")
    cfg, ckpt = ModelConfig.from_file(d / "config.json"), Checkpoint(d)
    quant = layer_quant(ckpt, cfg, read_quantization(d))
    fp = footprint(cfg, torch.float16, {n: i.nbytes for n, i in ckpt.tensors.items()}, quant)
    p = make_plan(fp, vram_budget=1 << 30, host_budget=1 << 40, max_context=4096, prefill_chunk=2048,
                  auto_chunk=True)
    assert p.prefill_chunk == 2048 and not p.streamed_layers


@pytest.mark.parametrize("short_mib", [1, 60, 150, 350])
def test_tile_never_costs_a_resident_layer(short_mib: int) -> None:
    """Below all-resident: the larger tile is taken only where the plan keeps every layer where it was."""
    kw = dict(host_budget=1 << 40, max_context=64, prefill_chunk=16)
    fixed_fp, growing_fp = _tiled_footprint(64 * MiB), _tiled_footprint(512 * MiB)
    budget = make_plan(fixed_fp, vram_budget=1 << 40, **kw).total_bytes - short_mib * MiB
    fixed, grown = make_plan(fixed_fp, vram_budget=budget, **kw), make_plan(growing_fp, vram_budget=budget, **kw)
    assert fixed.streamed_layers and grown.resident_layers == fixed.resident_layers
    assert grown.num_slots == fixed.num_slots and grown.streamed_bytes_per_step == fixed.streamed_bytes_per_step
    assert 64 * MiB <= grown.scratch_bytes <= 64 * MiB + budget - fixed.total_bytes and grown.total_bytes <= budget


def test_tile_range_of_a_7b(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 7B's widest projection is gate_up (2 x 18944 x 3584): its fp16 tile is the most that helps; a set
    LAYERSTREAM_DEQUANT_SCRATCH is fixed."""
    cfg = ModelConfig.from_dict(PRESETS["qwen2.5-7b"])
    assert widest_projection(cfg) == 2 * 18944 * 3584
    monkeypatch.delenv(ENV, raising=False)
    assert dequant_scratch_range(widest_projection(cfg) * 2) == (DEQUANT_SCRATCH, 2 * 18944 * 3584 * 2)
    assert dequant_scratch_range(1000) == (DEQUANT_SCRATCH, DEQUANT_SCRATCH)  # a tiny model: 64 MiB is plenty
    monkeypatch.setenv(ENV, "128MiB")
    assert dequant_scratch_range(widest_projection(cfg) * 2) == (128 * MiB, 128 * MiB)


@pytest.mark.parametrize("text, want", [(None, DEQUANT_SCRATCH), ("3MiB", 3 * MiB)])
def test_engine_ops_use_the_plans_tile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text, want) -> None:
    from engine.engine import Engine, EngineOptions
    d = synthesize("tiny-qwen2", tmp_path / "awq", quant="awq")
    if text is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, text)
    engine = Engine(d, EngineOptions(device="cpu", max_context=64))
    try:
        assert engine.plan.scratch_bytes == want and engine.ops._scratch == want
    finally:
        engine.close()
