"""Synthetic quantized checkpoints (engine/synth/quant.py, ``tools.synth --quant``).

Checked: the files validate against the format (names, shapes, dtypes from the headers), every
module converts to the canonical layout with weights of the synthesizer's spread, the real
presets' sizes and Qwen2.5-72B's padded intermediate size, and the CLI end to end (synth, then a
greedy run of the engine that names the format in its plan).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.quant.checkpoint import read_quantization, validate_quant_checkpoint
from engine.quant.config import load_quant_linear
from engine.quant.layout import linear_shapes
from engine.quant.spec import dequantize
from engine.synth.quant import QUANT_KINDS, QuantTensors, apply_quant
from engine.synth.writer import DEFAULT_MAX_SHARD_BYTES, SynthError, build_config, plan_shards, synthesize, tensor_specs

LABELS = {"awq": "awq int4 g32", "gptq": "gptq int4 g32 sym", "gptq8": "gptq int8 g32 sym",
          "ct-int4": "compressed-tensors int4 g32 sym", "int8": "compressed-tensors int8 per-channel sym"}


@pytest.mark.parametrize("kind", QUANT_KINDS)
@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3"])
def test_tiny_quantized_checkpoint_loads(tmp_path: Path, preset: str, kind: str) -> None:
    d = synthesize(preset, tmp_path / kind, quant=kind, seed=1)
    cfg = ModelConfig.from_file(d / "config.json")
    qc = read_quantization(d)
    assert qc is not None and qc.spec.label == LABELS[kind]
    ckpt = Checkpoint(d)
    validate_quant_checkpoint(ckpt, cfg, qc)
    dense = {"awq": torch.float16, "gptq": torch.float16, "gptq8": torch.float16}.get(kind, torch.bfloat16)
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == dense == ckpt.dtype
    for module, (n, k) in linear_shapes(cfg).items():
        qw = load_quant_linear(qc, f"model.layers.1.{module}", lambda s: ckpt.tensor(s) if s in ckpt.tensors else None,
                               n, k)
        w = dequantize(qw).float()
        std, mean = w.std().item(), w.mean().item()
        assert 0.01 < std < 0.04, f"{module}: weight std {std}"
        # centred as real checkpoints are: a common offset (uniform codes around a mid-range zero: -0.11 std)
        # grows through the residual stream until fp16 overflows; 4 standard errors of the mean
        assert abs(mean) < 4 * std / w.numel() ** 0.5, f"{module}: weight mean {mean} (std {std}, {w.numel()} weights)"
    ckpt.close()


@pytest.mark.parametrize("kind,size_gb,shards,inter", [
    ("awq", 5.57, 2, 18944), ("gptq", 5.58, 2, 18944), ("gptq8", 8.86, 2, 18944), ("ct-int4", 5.55, 2, 18944)])
def test_qwen25_7b_specs(kind: str, size_gb: float, shards: int, inter: int) -> None:
    """Sizes of the synthetic 7B checkpoints (computed from the specs, nothing written)."""
    cfg = apply_quant(build_config("qwen2.5-7b", "bf16"), kind)
    specs = QuantTensors(kind, cfg, tensor_specs(cfg, "bf16"), 0).specs
    assert cfg["intermediate_size"] == inter
    assert round(sum(s.nbytes for s in specs) / 1e9, 2) == size_gb
    assert len(plan_shards(specs, DEFAULT_MAX_SHARD_BYTES)) == shards
    names = {s.name: s for s in specs}
    if kind == "awq":
        assert names["model.layers.0.mlp.down_proj.qweight"].shape == (18944, 3584 // 8)
        assert names["model.layers.0.mlp.down_proj.scales"].shape == (18944 // 128, 3584)
    assert "lm_head.weight" in names and "model.layers.0.self_attn.q_proj.weight" not in names


@pytest.mark.parametrize("kind,inter", [("awq", 29696), ("gptq", 29696), ("ct-int4", 29568)])
def test_qwen25_72b_padding(kind: str, inter: int) -> None:
    """Qwen's 72B AWQ / GPTQ checkpoints pad intermediate_size 29568 -> 29696; llm-compressor's do not."""
    cfg = apply_quant(build_config("qwen2.5-72b", "bf16"), kind)
    assert cfg["intermediate_size"] == inter
    specs = {s.name: s for s in QuantTensors(kind, cfg, tensor_specs(cfg, "bf16"), 0).specs}
    up = "model.layers.79.mlp.up_proj." + ("weight_scale" if kind == "ct-int4" else "scales")
    assert inter in specs[up].shape


def test_cli_synth_then_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.run import main as run_main
    from tools.synth import main as synth_main

    out = tmp_path / "awq"
    assert synth_main(["--preset", "tiny-qwen2", "--out", str(out), "--quant", "awq"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    rc = run_main(["--model", str(out), "--prompt", "hi", "--no-chat", "--device", "cpu", "--max-new-tokens", "3",
                   "--max-context", "64", "--show-plan", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "awq int4 g32" in captured.out + captured.err
    assert len(json.loads(captured.out.strip().splitlines()[-1])["token_ids"]) == 3


def test_cli_bad_quant_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_qwen2_dir: Path) -> None:
    from engine.run import main as run_main
    from tools.synth import main as synth_main

    with pytest.raises(SystemExit) as e:  # argparse: one usage error line, exit 2
        synth_main(["--preset", "tiny-qwen2", "--out", str(tmp_path / "x"), "--quant", "nf4"])
    assert e.value.code == 2 and "invalid choice: 'nf4'" in capsys.readouterr().err
    with pytest.raises(SynthError, match="unknown --quant 'nf4'"):
        synthesize("tiny-qwen2", tmp_path / "y", quant="nf4")
    base = ["--model", str(tiny_qwen2_dir), "--prompt", "hi", "--no-chat", "--device", "cpu", "--max-new-tokens", "2"]
    assert run_main(base + ["--quantize", "int4", "--quant-group", "48"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--quant-group 48 does not divide" in err and "Traceback" not in err
    assert run_main(base + ["--quantize", "int8", "--quant-group", "32"]) == 0
    assert "layers as rtn int8 g32 sym (rounded to nearest on the host) in" in capsys.readouterr().err


def test_memreport_plan_only_counts_packed_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """memreport --plan-only on a quantized checkpoint (headers only) and on a preset with --quantize."""
    from engine.quant.checkpoint import layer_quant
    from engine.quant.layout import QuantLayerLayout
    from tools.memreport import main as memreport_main

    d = synthesize("tiny-qwen2", tmp_path / "gptq", quant="gptq")
    assert memreport_main(["--plan-only", "--model", str(d), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cfg, ckpt = ModelConfig.from_file(d / "config.json"), Checkpoint(d)
    packed = QuantLayerLayout.build(cfg, torch.float16, layer_quant(ckpt, cfg, read_quantization(d))).nbytes
    layers = [r for r in report["modules"] if r["name"].startswith("layers.")]
    assert layers and all(r["bytes"] == packed for r in layers)
    assert memreport_main(["--plan-only", "--preset", "qwen2.5-7b", "--quantize", "int4", "--vram-budget", "6GiB"]) == 0
    assert "rtn int4 g128" in capsys.readouterr().out
