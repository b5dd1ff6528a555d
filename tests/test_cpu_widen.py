"""engine.cpu_widen: with LAYERSTREAM_CPU_WIDEN=1 a CPU run holds its resident quantized layers widened to
the compute dtype when the RAM allows; the values are the packed ones decoded, so logits equal the packed
path's. Without it (the default, issue 15) every layer stays packed."""

from __future__ import annotations

import pytest
import torch

from engine.cpu_widen import widen_resident, widened_bytes
from engine.generate import generate
from engine.kv_cache import KVCache
from engine.quant.ggml import GGMLWeight
from engine.quant.spec import QuantWeight
from engine.sampling import SamplingParams
from tests.helpers import forward_prefill, make_engine


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_qwen2_dir):
    from engine.gguf.writer import write_gguf
    from engine.synth.writer import synthesize

    root = tmp_path_factory.mktemp("widen")
    return {"gguf-q4_k_m": write_gguf(tiny_qwen2_dir, root / "tiny.gguf", "Q4_K_M")[0],
            "awq": synthesize("tiny-qwen2", root / "awq", quant="awq", seed=1)}


def _packed(engine) -> int:
    return sum(isinstance(t, QuantWeight | GGMLWeight) for views in engine.weights.resident.values()
               for t in views.values())


def _logits(engine, prompt: list[int]) -> torch.Tensor:
    cache = KVCache(engine.cfg, 1, engine.opts.max_context, engine.dtype, engine.device)
    return forward_prefill(engine.model, cache, torch.tensor([prompt]))


@pytest.mark.parametrize("kind", ["gguf-q4_k_m", "awq"])
def test_widened_layers_give_the_packed_paths_logits_and_tokens(models, kind, monkeypatch):
    packed = make_engine(models[kind])  # the default
    monkeypatch.setenv("LAYERSTREAM_CPU_WIDEN", "1")
    widened = make_engine(models[kind])
    assert _packed(widened) == 0 and _packed(packed) > 0
    assert widened.quant_note and "widened to float32 for the CPU" in widened.quant_note
    assert "widened" not in packed.quant_note
    prompt = [5, 17, 300, 41, 9, 77, 2]
    torch.testing.assert_close(_logits(widened, prompt), _logits(packed, prompt), rtol=1e-5, atol=1e-5)
    outs = [generate(e, [prompt], SamplingParams(), max_new_tokens=10).token_ids[0] for e in (widened, packed)]
    assert outs[0] == outs[1]


def test_a_budget_or_quantize_keeps_layers_packed(models, tiny_qwen2_dir, monkeypatch):
    monkeypatch.setenv("LAYERSTREAM_CPU_WIDEN", "1")
    assert _packed(make_engine(models["awq"], vram_budget=1 << 30)) > 0  # the RAM the user gave resident bytes
    quantized = make_engine(tiny_qwen2_dir, quantize="int8", quant_group=32)  # asked for fewer bytes
    assert _packed(quantized) > 0 and "widened" not in quantized.quant_note


def test_nothing_is_widened_when_the_copies_would_not_fit_the_ram(models, monkeypatch):
    engine = make_engine(models["gguf-q4_k_m"])
    monkeypatch.setenv("LAYERSTREAM_CPU_WIDEN", "1")
    extra = widened_bytes(engine.weights, engine.dtype)
    assert extra > 0
    assert widen_resident(engine.weights, engine.dtype, False, available=extra) is None  # over 25% of it
    assert _packed(engine) > 0
    assert widen_resident(engine.weights, engine.dtype, False, available=8 * extra) is not None
    assert _packed(engine) == 0
