"""int4 host layers on torch's CPU int4 kernel (engine/host_int4.py).

Checked: the kernel's output against the dequantized reference matmul (fp32: to fp32 rounding;
bf16: to bf16's) for zero points, symmetric weights, additive mins, act-order permutations, odd
shapes and group sizes 32 / 64 / 128 (and larger groups and per-channel scales, expressed at a
group the kernel takes); the weights it refuses; and a tiny AWQ model whose host layers run the
kernel produces the tokens of the same model without host layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.footprint import min_budget
from engine.generate import generate
from engine.host_int4 import convert_layer, int4_linear, kernel_group, to_cpu_int4
from engine.quant.spec import QuantSpec, QuantWeight, dequantize, pack_codes
from engine.sampling import SamplingParams
from engine.synth.writer import synthesize
from tests.helpers import make_engine, random_prompts, rel_max_err


def _weight(n: int, k: int, group: int, form: str, seed: int, act_order: bool = False) -> QuantWeight:
    """A random int4 weight: ``form`` zeros (fp16 scales) | sym (bf16 scales) | mins (fp32 scales)."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group == -1 else group
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    dtype = {"zeros": torch.float16, "sym": torch.bfloat16, "mins": torch.float32}[form]
    scales = (torch.rand((n, k // g), generator=gen) * 0.05 + 0.002).to(dtype)
    zeros = torch.randint(0, 17, (n, k // g), generator=gen).to(dtype) if form == "zeros" else None
    mins = (-torch.rand((n, k // g), generator=gen) * 0.3).to(dtype) if form == "mins" else None
    perm = torch.randperm(k, generator=gen).to(torch.int32) if act_order else None
    spec = QuantSpec(4, group, form != "zeros", "test", mins=form == "mins")
    return QuantWeight(pack_codes(codes, 4), scales, zeros, perm, spec, k, mins)


SHAPES = [(16, 64), (48, 160), (112, 384), (4608 // 16, 3584 // 4)]  # (N, K); the last: a 7B qkv, scaled down
CASES = [(n, k, g) for n, k in SHAPES for g in (32, 64, 128) if k % g == 0]


@pytest.mark.parametrize("form", ["zeros", "sym", "mins"])
@pytest.mark.parametrize("n,k,group", CASES)
def test_int4_kernel_matches_the_dequantized_matmul(n, k, group, form):
    w = _weight(n, k, group, form, seed=n + k + group)
    c = to_cpu_int4(w, torch.float32)
    assert c is not None and c.group == group and c.packed.numel() == w.qweight.numel() * 4  # same packed bytes
    for m in (1, 3, 8):
        x = torch.randn((m, k), generator=torch.Generator().manual_seed(m))
        want = F.linear(x.double(), dequantize(w).double()).float()
        assert rel_max_err(int4_linear(x, c), want) <= 2e-6


@pytest.mark.parametrize("group,expressed", [(256, 256), (512, 256), (96, 32), (-1, 256)])
def test_larger_groups_and_per_channel_scales_are_expressed_at_a_kernel_group(group, expressed):
    n, k = 32, 1536  # per channel: G = K = 1536 = 6 * 256
    w = _weight(n, k, group, "zeros", seed=group % 1000)
    c = to_cpu_int4(w, torch.float32)
    assert c is not None and c.group == expressed == kernel_group(w.group_size)
    x = torch.randn((2, k), generator=torch.Generator().manual_seed(3))
    assert rel_max_err(int4_linear(x, c), F.linear(x, dequantize(w))) <= 2e-6


@pytest.mark.parametrize("form", ["zeros", "mins"])
def test_act_order_bias_and_leading_dims(form):
    w = _weight(64, 256, 64, form, seed=7, act_order=True)
    c = to_cpu_int4(w, torch.float32)
    x = torch.randn((2, 3, 256), generator=torch.Generator().manual_seed(1))
    bias = torch.randn(64, generator=torch.Generator().manual_seed(2))
    got = int4_linear(x, c, bias)
    assert got.shape == (2, 3, 64) and rel_max_err(got, F.linear(x, dequantize(w), bias)) <= 2e-6


@pytest.mark.parametrize("form", ["zeros", "sym", "mins"])
def test_bf16_activations_stay_within_bf16_rounding(form):
    w = _weight(128, 512, 128, form, seed=11)
    c = to_cpu_int4(w, torch.bfloat16)
    assert c.scales_and_zeros.dtype == torch.bfloat16
    x = torch.randn((4, 512), generator=torch.Generator().manual_seed(5)).bfloat16()
    want = F.linear(x.float(), dequantize(w))
    old = F.linear(x, dequantize(w).bfloat16())  # what the dequantizing path computes in bf16
    got = int4_linear(x, c)
    assert got.dtype == torch.bfloat16
    assert rel_max_err(got, want) <= 2e-2 and rel_max_err(old, want) <= 2e-2


@pytest.mark.parametrize("dtype,kernel", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.bfloat16)])
def test_a_host_layer_converts_its_int4_weights_for_the_lanes_dtype(dtype, kernel):
    w = _weight(64, 256, 64, "zeros", seed=9)
    views = {"mlp.down_proj.weight": w, "input_layernorm.weight": torch.ones(256, dtype=dtype)}
    out, extra = convert_layer(views, dtype)
    c = out["mlp.down_proj.weight"]
    assert out["input_layernorm.weight"] is views["input_layernorm.weight"]
    assert c.scales_and_zeros.dtype == kernel and extra == c.nbytes
    x = torch.randn((1, 256), generator=torch.Generator().manual_seed(3)).to(dtype)
    got = int4_linear(x, c)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype and rel_max_err(got, F.linear(x.float(), dequantize(w))) <= tol


@pytest.mark.parametrize("n,k,group,bits", [(40, 64, 32, 4), (16, 64, 16, 4), (16, 96, 48, 4), (32, 64, 32, 8)])
def test_weights_the_kernel_cannot_take_keep_the_dequantizing_path(n, k, group, bits):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    w = QuantWeight(pack_codes(codes, bits), torch.ones((n, k // group), dtype=torch.float16), None, None,
                    QuantSpec(bits, group, True, "test"), k)
    assert to_cpu_int4(w, torch.float32) is None


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory) -> Path:
    return synthesize("tiny-qwen2", tmp_path_factory.mktemp("host_int4") / "awq", quant="awq", seed=3)


@pytest.mark.parametrize("lengths", [[9], [4, 11]], ids=["batch1", "batch2"])
def test_tiny_awq_model_with_host_layers_matches_without(awq_dir, lengths):
    b = len(lengths)
    ref = make_engine(awq_dir, batch=b)
    low = min_budget(ref.cfg, torch.float32, batch=b, max_context=64, prefill_chunk=4, quant=ref.quant)
    ours = make_engine(awq_dir, batch=b, prefill_chunk=4, vram_budget=low, host_compute=2)
    lane = ours.model.host
    assert len(ours.plan.host_layers) == 2 and lane.int4_bytes > 0 and "int4 kernel" in lane.describe()
    assert all(type(v).__name__ == "CpuInt4Weight" for i in lane.layers for k, v in lane.views[i].items()
               if k.endswith("proj.weight"))
    prompts = random_prompts(lengths, ref.cfg.vocab_size, seed=4)
    want = generate(ref, prompts, SamplingParams(), max_new_tokens=6).token_ids
    assert generate(ours, prompts, SamplingParams(), max_new_tokens=6).token_ids == want
    assert lane.steps == 5
    ref.close()
    ours.close()


def test_measured_int4_rate_is_positive_and_checks_its_arguments():
    from engine.host_int4 import measure_int4_gemv

    assert 0.0 < measure_int4_gemv(1, torch.bfloat16, group=64, nbytes=1 << 20, repeats=2, hidden=512) < 10_000.0
    with pytest.raises(ValueError, match="must be positive"):
        measure_int4_gemv(0, torch.bfloat16)
    with pytest.raises(ValueError, match="group divide hidden"):
        measure_int4_gemv(1, torch.bfloat16, group=96, hidden=512)


def _layer_quant(*forms, main=QuantSpec(4, 128, False, "awq")):
    from engine.quant.layout import LayerQuant

    return LayerQuant(main, torch.float16, forms=tuple((f"p{i}", spec, torch.float16) for i, spec in enumerate(forms)))


@pytest.mark.parametrize("quant,want", [
    (_layer_quant(), 128),
    (_layer_quant(main=QuantSpec(4, 96, False, "gptq")), 32),
    (_layer_quant(main=QuantSpec(4, -1, True, "ct")), 256),
    (_layer_quant(QuantSpec(4, 32, True, "gguf", mins=True)), 32),
    (_layer_quant(main=QuantSpec(8, 128, True, "gptq")), None),
    (_layer_quant(QuantSpec(8, 16, True, "gguf")), None),  # a Q6_K-like int8 form: not all layers take the kernel
    (_layer_quant(main=QuantSpec(4, 16, False, "x")), None),  # no kernel group divides 16
])
def test_int4_host_group(quant, want):
    from engine.host_int4 import int4_host_group

    assert int4_host_group(quant) == want


def test_the_engine_measures_the_int4_rate_for_int4_layers(monkeypatch):
    """Engine._host_rate: int4 layers get the CPU int4 kernel's rate under its own cache entry; int8 ones
    none (they reach the host only with --host-compute N)."""
    import types

    import engine.engine as eng_mod

    calls = []
    monkeypatch.setattr(eng_mod, "run_pinned", lambda pick, fn, *a: fn(*a))
    monkeypatch.setattr(eng_mod, "machine_pick", lambda disk_tier: None)
    monkeypatch.setattr(eng_mod, "host_gemv_rate",
                        lambda batch, dtype, contend=None, form="", measure=None: calls.append((form, measure)) or (9.0, "x"))
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), opts=types.SimpleNamespace(batch=1),
                                 dtype=torch.bfloat16, quant=_layer_quant())
    assert eng_mod.Engine._host_rate(fake, "auto") == (9.0, "x")
    form, measure = calls[-1]
    assert form == "int4 g128 CPU kernel" and measure.keywords == {"group": 128}
    fake.quant = None
    eng_mod.Engine._host_rate(fake, "auto")
    assert calls[-1] == ("", None)  # the dense GEMV
    fake.quant = _layer_quant(main=QuantSpec(8, 128, True, "gptq"))
    rate, why = eng_mod.Engine._host_rate(fake, "auto")
    assert rate is None and "without a CPU kernel" in why and len(calls) == 2
