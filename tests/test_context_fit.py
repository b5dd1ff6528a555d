"""A default --max-context is held to the positions the model was trained on; an explicit one stays, with the
plan's note (CPU, a tiny-qwen2 checkpoint whose config says 1024 positions)."""

from __future__ import annotations

import pytest

from engine import LLM
from engine.config import ModelConfig
from engine.options import EngineOptions, fit_context
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


@pytest.mark.parametrize("fields,window", [
    ({"model_type": "mistral", "sliding_window": 512}, 512),  # Mistral-7B-v0.1: every layer slides
    ({"model_type": "mistral"}, 4096),  # no key: transformers' MistralConfig default
    ({"model_type": "mistral", "sliding_window": None}, None),  # v0.2 on
    ({"model_type": "qwen2", "sliding_window": 32768, "use_sliding_window": False}, None),  # Qwen2.5's configs
    ({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": True, "max_window_layers": 1}, 256),
    ({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": True, "max_window_layers": 3}, None),
    ({"model_type": "qwen3", "sliding_window": 256, "layer_types": ["full_attention", "sliding_attention",
                                                                     "full_attention"]}, 256),
    ({"model_type": "llama", "sliding_window": 256}, None),
])
def test_a_sliding_window_holds_the_context(fields, window):
    """Past a sliding window the engine's attention (which has none) would silently differ from the model's: a
    default context is lowered to the window, a larger one asked for is an error naming the flag."""
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
            "vocab_size": 100, "max_position_embeddings": 32768}
    cfg = ModelConfig.from_dict({**base, **fields})
    assert cfg.attention_window == window
    auto = EngineOptions(max_context=4096, max_context_auto=True)
    fit_context(cfg, auto)
    assert auto.max_context == min(4096, window or 4096)
    asked = EngineOptions(max_context=8192)
    if window is None:
        fit_context(cfg, asked)
        assert asked.max_context == 8192
    else:
        with pytest.raises(ValueError, match=f"slides over the last {window} tokens.*--max-context {window} or less"):
            fit_context(cfg, asked)


def test_the_cli_refuses_a_context_past_the_window(tiny_qwen2_dir, tmp_path, capsys):
    model = linked_model(tiny_qwen2_dir, tmp_path / "window", config={"sliding_window": 128, "use_sliding_window": True,
                                                                       "max_window_layers": 1, "layer_types": None})
    assert main(["--model", str(model), *CPU, "--max-context", "256"]) == 2
    assert "error: this model's attention slides over the last 128 tokens" in capsys.readouterr().err
    assert main(["--model", str(model), *CPU]) == 0


@pytest.mark.parametrize("window", [None, 128])
def test_a_gguf_sliding_window_holds_the_context(tiny_qwen2_dir, tmp_path, capsys, window):
    """llama.cpp's ``{arch}.attention.sliding_window`` key (written by engine.gguf.writer for a model whose
    attention slides) is read back: the context is held to it as for a config.json."""
    from engine.gguf.config import config_from_gguf
    from engine.gguf.reader import open_gguf_files
    from engine.gguf.writer import write_gguf

    fields = {"sliding_window": window, "use_sliding_window": True, "max_window_layers": 0, "layer_types": None} \
        if window else {}
    model = linked_model(tiny_qwen2_dir, tmp_path / "src", config=fields)
    gguf = write_gguf(model, tmp_path / "tiny.gguf", "Q8_0")[0]
    assert config_from_gguf(open_gguf_files(gguf), "float32").attention_window == window
    rc = main(["--model", str(gguf), *CPU, "--max-context", "256"])
    assert rc == (2 if window else 0)
    if window:
        assert "error: this model's attention slides over the last 128 tokens" in capsys.readouterr().err
