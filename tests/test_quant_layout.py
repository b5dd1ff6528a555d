"""The packed quantized layer (engine/quant/layout.py) and how the streamer gets its bytes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.quant.checkpoint import layer_quant, read_quantization
from engine.quant.config import load_quant_linear
from engine.quant.layout import FUSED_LINEARS, QuantLayerLayout, linear_shapes
from engine.synth.writer import synthesize
from engine.weights import UnitBuilder
from streamer.files import SpanReader


def _load(d: Path, dtype: torch.dtype):
    cfg, ckpt = ModelConfig.from_file(d / "config.json"), Checkpoint(d)
    quant = layer_quant(ckpt, cfg, read_quantization(d))
    return cfg, ckpt, quant, QuantLayerLayout.build(cfg, dtype, quant)


@pytest.mark.parametrize("kind", ["ct-int4", "int8", "awq", "gptq"])
def test_fused_views_hold_each_module(tmp_path: Path, kind: str) -> None:
    """Every fused projection's rows are its parts' canonical tensors, one after the other."""
    d = synthesize("tiny-qwen2", tmp_path / kind, quant=kind)
    cfg, ckpt, quant, layout = _load(d, torch.float32)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    get = lambda n: ckpt.tensor(n) if n in ckpt.tensors else None  # noqa: E731
    layout.pack(get, "model.layers.2", buf)
    views = layout.views(buf)
    shapes = linear_shapes(cfg)
    for fused, parts in FUSED_LINEARS.items():
        w, row = views[f"{fused}.weight"], 0
        for part in parts:
            ref = load_quant_linear(quant.source, f"model.layers.2.{part}", get, *shapes[part])
            n = ref.shape[0]
            assert torch.equal(w.qweight[row:row + n], ref.qweight) and torch.equal(w.scales[row:row + n], ref.scales)
            row += n
    q_bias = ckpt.tensor("model.layers.2.self_attn.q_proj.bias").float()
    assert torch.equal(views["self_attn.qkv_proj.bias"][:cfg.q_size], q_bias)
    assert torch.equal(views["input_layernorm.weight"], ckpt.tensor("model.layers.2.input_layernorm.weight").float())


def test_compressed_tensors_units_are_raw_file_spans(tmp_path: Path) -> None:
    """compressed-tensors sym in its own dtype: the unit is read straight from the files, and the
    bytes equal what the host packer makes; other formats (or another compute dtype) pack."""
    d = synthesize("tiny-qwen3", tmp_path / "ct", quant="ct-int4")
    cfg, ckpt, _, layout = _load(d, torch.bfloat16)
    unit = UnitBuilder(ckpt, cfg, layout).layer(1, "pinned")
    assert unit.spans and unit.pack is None
    raw, packed = torch.zeros(layout.nbytes, dtype=torch.uint8), torch.zeros(layout.nbytes, dtype=torch.uint8)
    SpanReader().fill(unit, raw)
    layout.pack(lambda n: ckpt.tensor(n) if n in ckpt.tensors else None, "model.layers.1", packed)
    assert torch.equal(raw, packed)
    cfg32, ckpt32, _, layout32 = _load(d, torch.float32)
    assert UnitBuilder(ckpt32, cfg32, layout32).layer(1, "pinned").pack is not None  # norms need a cast
    a = synthesize("tiny-qwen3", tmp_path / "awq", quant="awq")
    cfga, ckpta, _, layouta = _load(a, torch.float16)
    assert UnitBuilder(ckpta, cfga, layouta).layer(1, "pinned").pack is not None  # AWQ is repacked
