"""GGUF layers held packed (``engine.gguf.repack``): what the plan counts, streaming, and the cache.

Files whose layers are all of types the ggml kernels decode (Q4_K / Q5_K / Q6_K, Q8_0 / Q4_0 / Q4_1 /
Q5_0 / Q5_1) are held as their own blocks by default (``tests/test_gguf_native.py``); the tests of
the repacked form set ``LAYERSTREAM_GGUF_NATIVE=0``.

The tiny GGUF files of ``tests/test_gguf_tiny.py`` (whose logits test, run on these same files,
now goes through the packed layers); here: the run's quantized form per file type, the plan's layer
bytes equal to the packed layout (bits per weight of the linear weights as the form implies, far
below the widened fp32 / bf16), the packed projections dequantizing to the widened tensors, and
streamed layers (pinned and disk tiers, and ``--quant-cache``) giving transformers' greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

from engine.footprint import min_budget
from engine.generate import generate
from engine.quant.layout import FUSED_LINEARS, QuantLayerLayout, dense_shapes, dense_shapes_of, linear_shapes
from engine.quant.spec import QuantWeight, dequantize
from engine.sampling import SamplingParams
from tests.helpers import hf_greedy, make_engine, random_prompts
from tests.test_gguf_tiny import gguf_model  # noqa: F401 (the fixture)

# file type -> each fused projection's form (bits, group, additive mins, scale bytes), "*" for all of them;
# the K_M files hold Q6_K in some layers' attn_v / ffn_down (llama.cpp's use_more_bits), so qkv and down
# take the form that holds both Q6_K and the file's K-quant, o and gate_up the K-quant's own
K_M = {"self_attn.qkv_proj": (8, 16, True, 4), "mlp.down_proj": (8, 16, True, 4)}
FORMS = {("llama", "Q4_0"): {"*": (4, 32, False, 2)}, ("qwen2", "Q8_0"): {"*": (8, 32, False, 2)},
         ("qwen3", "Q4_1"): {"*": (4, 32, True, 2)}, ("qwen2", "Q5_1"): {"*": (8, 32, True, 2)},
         ("llama", "Q5_0"): {"*": (8, 32, False, 2)}, ("qwen2-tied", "Q6_K"): {"*": (8, 16, False, 4)},
         ("llama", "Q4_K_M"): {**K_M, "*": (4, 32, True, 4)}, ("qwen3", "Q5_K_M"): {**K_M, "*": (8, 32, True, 4)}}
# bits per linear weight those forms store (codes + scales + mins per group), by hand: e.g. Q4_K_M's
# qkv and down at 8 + 32/16 + 32/16 = 12, its o and gate_up at 4 + 32/32 + 32/32 = 6, weighted by size
BITS = {("llama", "Q4_0"): 4.5, ("qwen2", "Q8_0"): 8.5, ("qwen3", "Q4_1"): 5.0, ("qwen2", "Q5_1"): 9.0,
        ("llama", "Q5_0"): 8.5, ("qwen2-tied", "Q6_K"): 10.0, ("llama", "Q4_K_M"): 5111808 / 589824,
        ("qwen3", "Q5_K_M"): 11.0}


def _linear_bits(layout: QuantLayerLayout) -> float:
    """Stored bits per weight of the layout's linear weights (codes, scales, mins)."""
    weights = sum(n * k for n, k in layout.shapes.values())
    dense = {n for n, _ in dense_shapes_of(layout)} | {"self_attn.qkv_proj.bias"}
    stored = sum(torch.Size(e.shape).numel() * e.dtype.itemsize for n, e in layout.entries.items() if n not in dense)
    return stored * 8 / weights


def _form_bits(layout: QuantLayerLayout, forms: dict) -> float:
    """Bits per linear weight implied by ``forms`` (each projection's codes, group scales and mins)."""
    total = weights = 0
    for fused, parts in FUSED_LINEARS.items():
        bits, group, mins, sbytes = forms.get(fused, forms["*"])
        n = sum(layout.shapes[p][0] * layout.shapes[p][1] for p in parts)
        total, weights = total + n * (bits + sbytes * 8 / group * (2 if mins else 1)), weights + n
    return total / weights


@pytest.mark.parametrize("case", list(FORMS), ids=[f"{f}-{t}" for f, t in FORMS])
def test_layers_are_packed_at_the_form_size(gguf_model, case, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LAYERSTREAM_GGUF_NATIVE", "0")  # layers repacked (tests/test_gguf_native.py: as they are)
    _, path = gguf_model(*case)
    engine = make_engine(path, max_context=32)
    forms = FORMS[case]
    for fused in FUSED_LINEARS:
        spec, sdt = engine.quant.form(fused)
        assert (spec.bits, spec.group_size, spec.mins, sdt.itemsize) == forms.get(fused, forms["*"]), fused
    layout = engine.weights.layout
    assert isinstance(layout, QuantLayerLayout) and engine.plan.layer_bytes == layout.nbytes
    assert engine.plan.module("layers.1").bytes == layout.nbytes
    bpw = _linear_bits(layout)
    assert bpw == pytest.approx(_form_bits(layout, forms))
    assert bpw == pytest.approx(BITS[case])
    cfg = engine.cfg
    widened = sum(n * k for n, k in linear_shapes(cfg).values()) * 4 + sum(
        torch.Size(s).numel() * 4 for _, s in dense_shapes(cfg))
    assert layout.nbytes < widened * bpw / 32 * 1.1, (layout.nbytes, widened)  # 256-byte alignment, fp32 norms
    note = next(n for n in engine.plan.notes if n.startswith("GGUF: "))
    assert f"layers packed as {engine.quant.label}" in note and "token_embd" in note and "widened" in note
    # the packed projections are the widened tensors, exactly (same rows: llama's Q/K unpermuted too)
    views = engine.weights.layer(1)
    qkv, up = views["self_attn.qkv_proj.weight"], views["mlp.gate_up_proj.weight"]
    assert isinstance(qkv, QuantWeight) and (qkv.mins is not None) == forms.get("self_attn.qkv_proj", forms["*"])[2]
    widened_qkv = torch.cat([engine.ckpt.tensor(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"])
    assert torch.equal(dequantize(qkv), widened_qkv)
    assert torch.equal(dequantize(up)[cfg.intermediate_size:], engine.ckpt.tensor("model.layers.1.mlp.up_proj.weight"))
    engine.close()


@pytest.mark.parametrize("case,tier,native", [
    (("llama", "Q4_K_M"), "pinned", True), (("llama", "Q4_K_M"), "disk", True), (("qwen3", "Q4_1"), "pinned", False),
    (("qwen2", "Q8_0"), "disk", False), (("qwen2", "Q8_0"), "disk", True)],
    ids=["Q4_K_M-pinned-native", "Q4_K_M-disk-native", "Q4_1-pinned", "Q8_0-disk", "Q8_0-disk-native"])
def test_streamed_packed_layers_give_transformers_tokens(gguf_model, case, tier, native, monkeypatch):  # noqa: F811
    """Resident and streamed engines give transformers' greedy tokens, with the layers held as the
    file's blocks (native) or repacked (``LAYERSTREAM_GGUF_NATIVE=0``)."""
    if not native:
        monkeypatch.setenv("LAYERSTREAM_GGUF_NATIVE", "0")
    ref, path = gguf_model(*case)
    resident = make_engine(path, max_context=32)
    assert bool(resident.quant.native) == native
    low = min_budget(resident.cfg, torch.float32, max_context=32, prefill_chunk=2048, quant=resident.quant)
    streamed = make_engine(path, max_context=32, vram_budget=low, host_budget=(1 << 30) if tier == "pinned" else 0)
    plan = streamed.plan
    assert plan.streamed_layers and (tier == "pinned" or plan.disk_layers)
    assert plan.slot_bytes >= plan.layer_bytes == resident.weights.layout.nbytes
    prompt = random_prompts([5], resident.cfg.vocab_size, seed=21)[0]
    want = hf_greedy(ref, prompt, 10)
    for engine in (resident, streamed):
        assert generate(engine, [prompt], SamplingParams(), max_new_tokens=10).token_ids[0] == want
        engine.close()


def test_quant_cache_keeps_repacked_layers(gguf_model, tmp_path, monkeypatch):  # noqa: F811
    """``--quant-cache`` writes the repacked layers once; a later run reads them without repacking."""
    from engine.quant import layout as layout_mod

    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAYERSTREAM_GGUF_NATIVE", "0")  # native K-quant layers need no cache
    _, path = gguf_model("llama", "Q4_K_M")
    first = make_engine(path, quant_cache=True)
    prompt = random_prompts([5], first.cfg.vocab_size, seed=22)[0]
    want = generate(first, [prompt], SamplingParams(), max_new_tokens=6).token_ids[0]
    files = list((tmp_path / "cache" / "quant").glob("*.bin"))
    assert len(files) == 1 and files[0].stat().st_size == first.cfg.num_hidden_layers * first.weights.layout.nbytes
    first.close()

    def no_packing(*args, **kwargs):
        raise AssertionError("a cached layer was repacked")

    monkeypatch.setattr(layout_mod.QuantLayerLayout, "pack", no_packing)
    again = make_engine(path, quant_cache=True, vram_budget=min_budget(
        first.cfg, torch.float32, max_context=64, prefill_chunk=2048, quant=first.quant), host_budget=0)
    assert again.plan.disk_layers
    assert generate(again, [prompt], SamplingParams(), max_new_tokens=6).token_ids[0] == want
    again.close()


def test_quantize_flag_on_a_quantized_gguf_is_an_error(gguf_model):  # noqa: F811
    _, path = gguf_model("qwen2", "Q8_0")
    with pytest.raises(ValueError, match="already quantized"):
        make_engine(path, quantize="int4")


def test_float_gguf_layers_stay_widened(gguf_model):  # noqa: F811
    _, path = gguf_model("qwen2", "F16")
    engine = make_engine(path, max_context=32)
    assert engine.quant is None and not isinstance(engine.weights.layout, QuantLayerLayout)
    assert any(n.startswith("GGUF: layers widened") for n in engine.plan.notes)
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("case,native,intermediate", [(("qwen3", "Q4_1"), False, 512), (("llama", "Q4_K_M"), True, 288)],
                         ids=["Q4_1-repacked", "Q4_K_M-fallbacks"])  # the second holds Q4_K, Q6_K, Q5_0 and Q8_0
def test_fused_kernels_on_packed_layers_match_transformers(gguf_model, case, native, intermediate,  # noqa: F811
                                                           monkeypatch):
    """The Triton kernels read the GGUF layers (interpreted on the CPU without a GPU): Q4_K_M as its
    blocks (ggml_dequant tiles for the prefill of 2 x 40 rows, ggml_gemv for decode; with rows of 288
    its ffn_down blocks are llama.cpp's Q5_0 / Q8_0 fallbacks; 45 s interpreted on 2 cores), Q4_1 repacked
    (``LAYERSTREAM_GGUF_NATIVE=0``: qgemm and qgemv, additive mins): transformers' logits. (The q5_k
    and other block-32 kernels are checked against the reference in tests/test_kernels_ggml.py; a
    Q5_K_M case here costs 156 s interpreted.)"""
    from engine.kv_cache import KVCache
    from tests.helpers import forward_decode, forward_prefill, rel_max_err

    if not native:
        monkeypatch.setenv("LAYERSTREAM_GGUF_NATIVE", "0")
    ref, path = gguf_model(*case, intermediate=intermediate, layers=2)  # 2 layers: still both ffn_down fallbacks
    engine = make_engine(path, batch=2, max_context=48, kernels="triton")
    assert bool(engine.quant.native) == native  # kernels.ggml_gemv / ggml_dequant
    if intermediate % 256:
        assert {sig[-1] for sig in engine.quant.native} == {"q5_0", "q8_0"}  # ffn_down (MODULES' last)
    ids = torch.randint(0, engine.cfg.vocab_size, (2, 43), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ref(ids).logits.float()
    cache = KVCache(engine.cfg, 2, 48, torch.float32, "cpu")
    got = forward_prefill(engine.model, cache, ids[:, :40], last_only=False)
    assert rel_max_err(got, want[:, :40]) <= 1e-4
    for t in range(40, 43):
        assert rel_max_err(forward_decode(engine.model, cache, ids[:, t], t), want[:, t]) <= 1e-4
    engine.close()
