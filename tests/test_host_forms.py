"""How host layers hold quantized weights (engine/host_forms.py): the forms a run may take, the pick
by measured rate, widened layers equal to the dequantized weights, and tiny models whose widened host
layers give the tokens of the same model without host layers."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import engine.host_forms as forms
from engine.config import ModelConfig
from engine.footprint import min_budget
from engine.generate import generate
from engine.quant.layout import LayerQuant, QuantLayerLayout
from engine.quant.spec import QuantSpec, QuantWeight, dequantize, pack_codes
from engine.sampling import SamplingParams
from engine.synth.writer import synthesize
from tests.helpers import make_engine, random_prompts

AWQ = LayerQuant(QuantSpec(4, 128, False, "awq"), torch.float16)
INT8 = LayerQuant(QuantSpec(8, -1, True, "int8"), torch.bfloat16)


def _cfg() -> ModelConfig:
    return ModelConfig.from_dict(dict(model_type="qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                      max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e4))


def test_forms_by_quantization_and_ram(monkeypatch):
    monkeypatch.delenv("LAYERSTREAM_HOST_WEIGHTS", raising=False)
    cfg, bf16, plenty = _cfg(), torch.bfloat16, 1 << 40
    widened = cfg.num_hidden_layers * forms.widened_layer_bytes(cfg, bf16)
    assert forms.weight_forms(cfg, bf16, None, plenty) == ("",)  # full precision: the dense GEMV
    assert forms.weight_forms(cfg, bf16, AWQ, plenty) == ("int4", "widened")
    assert forms.weight_forms(cfg, bf16, AWQ, 4 * widened) == ("int4", "widened")  # exactly a quarter
    assert forms.weight_forms(cfg, bf16, AWQ, 4 * widened - 1) == ("int4",)
    assert forms.weight_forms(cfg, bf16, INT8, plenty) == ("widened",)  # no CPU kernel for int8
    assert forms.weight_forms(cfg, bf16, INT8, 1 << 20) == ("packed",)
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", "widened")
    assert forms.weight_forms(cfg, bf16, AWQ, plenty) == ("widened",)
    with pytest.raises(ValueError, match="widened: 4 widened layers would not fit 25% of the RAM"):
        forms.weight_forms(cfg, bf16, AWQ, 1 << 20)
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", "int4")
    with pytest.raises(ValueError, match="int4: torch's CPU int4 kernel does not take these layers"):
        forms.weight_forms(cfg, bf16, INT8, plenty)
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", "fast")
    with pytest.raises(ValueError, match="must be int4 or widened, got 'fast'"):
        forms.weight_forms(cfg, bf16, AWQ, plenty)


def test_widened_bytes_and_the_packed_ratio():
    cfg = _cfg()
    dense = sum(n * k for n, k in [(256, 256), (128, 256), (128, 256), (256, 256), (512, 256), (512, 256),
                                   (256, 512)])
    assert forms.widened_layer_bytes(cfg, torch.bfloat16) >= dense * 2  # weights (+ norms, biases, alignment)
    assert forms.widened_layer_bytes(cfg, torch.bfloat16) < dense * 2 * 1.05
    ratio = forms.packed_per_widened(cfg, torch.bfloat16, AWQ)
    packed = QuantLayerLayout.build(cfg, torch.bfloat16, AWQ).nbytes
    assert ratio == packed / forms.widened_layer_bytes(cfg, torch.bfloat16)
    assert 0.25 < ratio < 0.33  # int4 + fp16 scales and zeros per 128 over bf16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int4,dense,want", [(0.9, 67.0, "widened"), (30.0, 67.0, "int4")])
def test_the_faster_form_is_picked_in_packed_bytes(int4, dense, want, dtype):
    calls = []

    def rate(batch, dtype, form="", measure=None):
        calls.append((form, measure))
        return (int4 if form else dense), "cached from today"

    form, gbps, source = forms.pick_form(("int4", "widened"), AWQ, dtype, 1, 0.28, rate)
    assert form == want and gbps == pytest.approx(max(int4, dense * 0.28))
    # fp16 lanes run the kernel in bf16 (its entry says so); widened layers share the dense GEMV's entry
    assert [f for f, _ in calls] == ["int4 g128 CPU kernel in bfloat16", ""]
    assert calls[0][1].keywords == {"group": 128} and calls[1][1] is None
    assert source == "cached from today" + (", the dense GEMV's over the widened bytes" if want == "widened" else "")


def _int8_weight(n: int, k: int, seed: int) -> QuantWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand((n, 1), generator=gen) * 0.01).to(torch.bfloat16)
    return QuantWeight(pack_codes(codes, 8), scales, None, None, QuantSpec(8, -1, True, "int8"), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_widened_layer_holds_the_dequantized_weights(dtype, monkeypatch):
    """Widened a few rows at a time (WIDEN_ROWS 16: chunks with a remainder, across a GGUF weight's
    parts): the dequantized weights exactly, for int8, int4 with zero points, mins or act order, and
    ggml blocks of two types."""
    from engine.quant.ggml import GGMLWeight
    from tests.test_host_int4 import _weight
    from tests.test_kernels_ggml import weights as ggml_blocks

    monkeypatch.setattr(forms, "WIDEN_ROWS", 16)
    ws = {"int8": _int8_weight(48, 96, seed=1), "zeros": _weight(40, 128, 32, "zeros", seed=2),
          "mins": _weight(40, 128, 64, "mins", seed=3), "act": _weight(37 + 3, 128, 32, "sym", seed=4, act_order=True),
          "ggml": GGMLWeight((("q8_0", ggml_blocks("q8_0", 20, 64)), ("q4_1", ggml_blocks("q4_1", 30, 64, seed=1))), 64)}
    norm = torch.ones(96)
    held, extra = forms.hold_layer({**ws, "input_layernorm.weight": norm}, dtype, "widened")
    for name, w in ws.items():
        got = held[name]
        assert got.dtype == dtype and got.is_contiguous() and got.shape == w.shape, name
        assert torch.equal(got, (dequantize(w) if name != "ggml" else w.dequantize()).to(dtype)), name
    assert held["input_layernorm.weight"] is norm and extra == sum(held[n].nbytes for n in ws)
    same, none = forms.hold_layer({"w": ws["int8"]}, dtype, "packed")
    assert same["w"] is ws["int8"] and none == 0


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = synthesize("tiny-qwen2", tmp_path_factory.mktemp("host_forms") / kind, quant=kind, seed=3)
        return made[kind]
    return get


@pytest.mark.parametrize("kind,forced,form", [("awq", "", "int4"), ("awq", "widened", "widened"),
                                              ("int8", "", "widened")])
@pytest.mark.parametrize("lengths", [[9], [4, 11]], ids=["batch1", "batch2"])
def test_host_layers_give_the_tokens_without_host_layers(quant_dir, monkeypatch, kind, forced, form, lengths):
    """Host layers held as torch's CPU int4 kernel takes them (the default without a measured rate,
    where it can) or widened (int8 layers, which it cannot): the tokens of the model without host layers."""
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", forced)
    b, path = len(lengths), quant_dir(kind)
    ref = make_engine(path, batch=b)
    low = min_budget(ref.cfg, torch.float32, batch=b, max_context=64, prefill_chunk=4, quant=ref.quant)
    ours = make_engine(path, batch=b, prefill_chunk=4, vram_budget=low, host_compute=2)
    lane = ours.model.host
    assert len(ours.plan.host_layers) == 2 and lane.weight_form == form and lane.held_bytes > 0
    held = {type(v).__name__ for i in lane.layers for k, v in lane.views[i].items() if k.endswith("proj.weight")}
    assert held == ({"CpuInt4Weight"} if form == "int4" else {"Tensor"})
    assert ("int4 kernel" if form == "int4" else "widened to torch.float32") in lane.describe()
    widened = forms.widened_layer_bytes(ours.cfg, torch.float32)
    assert lane.layer_bytes == (widened if form == "widened" else ours.weights.layout.nbytes)
    prompts = random_prompts(lengths, ref.cfg.vocab_size, seed=4)
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=6).token_ids
    assert generate(ours, prompts, SamplingParams(), max_new_tokens=6).token_ids == want
    assert lane.steps == 5
    ref.close()
    ours.close()


def test_the_engine_picks_the_host_form_by_rate(monkeypatch):
    """Engine._host_rate on a GPU: each candidate form's rate, the faster kept as ``host_weights``; a
    plan with no fast form (packed) gets no rate."""
    import engine.engine as eng_mod

    monkeypatch.delenv("LAYERSTREAM_HOST_WEIGHTS", raising=False)
    monkeypatch.setattr(eng_mod, "run_pinned", lambda pick, fn, *a: fn(*a))
    monkeypatch.setattr(eng_mod, "machine_pick", lambda disk_tier: None)
    monkeypatch.setattr(eng_mod, "host_gemv_rate", lambda batch, dtype, contend=None, form="", measure=None:
                        (0.9 if form else 60.0, "measured now"))
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), opts=types.SimpleNamespace(batch=1),
                                 dtype=torch.bfloat16, quant=AWQ, cfg=_cfg())
    gbps, source = eng_mod.Engine._host_rate(fake, "auto")
    ratio = forms.packed_per_widened(fake.cfg, torch.bfloat16, AWQ)
    assert fake.host_weights == "widened" and gbps == pytest.approx(60.0 * ratio)
    assert source.endswith("; host layers widened")
    monkeypatch.setattr(forms.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1 << 20))
    fake.quant = INT8
    assert eng_mod.Engine._host_rate(fake, "auto") == (None, "not measured: quantized layers the CPU has no fast "
                                                       "form for (no int4 kernel, and too little RAM to widen them)")
    assert fake.host_weights == "packed"
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", "fast")  # not looked at with host compute off
    assert eng_mod.Engine._host_rate(fake, "off") == (None, "not measured: host compute off")
    with pytest.raises(ValueError, match="LAYERSTREAM_HOST_WEIGHTS must be"):
        eng_mod.Engine._host_rate(fake, "auto")
