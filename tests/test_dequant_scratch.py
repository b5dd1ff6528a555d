"""The prefill's dense tile of packed layers (engine.quant.ggml.dequant_scratch): its default, the
LAYERSTREAM_DEQUANT_SCRATCH override, bad values refused, and the plan and the ops using one size."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.config import ModelConfig
from engine.footprint import footprint
from engine.quant.checkpoint import layer_quant, read_quantization
from engine.quant.ggml import DEQUANT_SCRATCH, dequant_scratch
from engine.synth.writer import synthesize

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
    from engine.ops import TritonOps
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
    assert work[DEQUANT_SCRATCH] - work[3 << 20] == DEQUANT_SCRATCH - (3 << 20)  # the plan holds the tile


def test_cli_names_a_bad_value_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """engine.run on a packed model: one error line naming the variable, not a dtype note built from it."""
    from engine.run import main
    d = synthesize("tiny-qwen2", tmp_path / "awq", quant="awq")
    monkeypatch.setenv(ENV, "lots")
    assert main(["--model", str(d), "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ENV}: cannot parse size 'lots'") and "note:" not in err and "Traceback" not in err
