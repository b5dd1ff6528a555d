"""A default --max-context is held to the positions the model was trained on; an explicit one stays, with the
plan's note (CPU, a tiny-qwen2 checkpoint whose config says 1024 positions)."""

from __future__ import annotations

import pytest

from engine import LLM
from engine.config import ModelConfig
from engine.engine import EngineOptions, fit_context
from engine.run import main
from tests.helpers import linked_model

CPU = ["--device", "cpu", "--prompt", "hi", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def short_dir(tiny_qwen2_dir, tmp_path_factory):
    """tiny-qwen2's files (linked) with max_position_embeddings 1024 in its config."""
    return linked_model(tiny_qwen2_dir, tmp_path_factory.mktemp("short-context"),
                        config={"max_position_embeddings": 1024})


def test_fit_context_lowers_only_a_default(short_dir):
    cfg = ModelConfig.from_file(short_dir / "config.json")
    auto = EngineOptions(max_context=4096, max_context_auto=True)
    fit_context(cfg, auto)
    assert auto.max_context == 1024
    asked = EngineOptions(max_context=4096)
    fit_context(cfg, asked)
    assert asked.max_context == 4096
    short = EngineOptions(max_context=512, max_context_auto=True)
    fit_context(cfg, short)
    assert short.max_context == 512


def test_cli_default_fits_and_an_explicit_context_gets_the_plan_note(short_dir, capsys):
    assert main(["--model", str(short_dir), *CPU]) == 0
    err = capsys.readouterr().err
    assert "note:" not in err, err
    assert main(["--model", str(short_dir), *CPU, "--max-context", "2048"]) == 0
    err = capsys.readouterr().err
    assert "max_context 2048 exceeds the model's max_position_embeddings 1024" in err


def test_llm_default_fits(short_dir):
    with LLM(short_dir, device="cpu", dtype="fp32", kernels="torch", max_batch=1) as m:
        assert m.engine.opts.max_context == 1024
    with LLM(short_dir, device="cpu", dtype="fp32", kernels="torch", max_batch=1, max_context=1500) as m:
        assert m.engine.opts.max_context == 1500
