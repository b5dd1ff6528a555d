"""int4 host layers on torch's CPU int4 kernel (engine/host_int4.py).

Checked: the kernel's output against the dequantized reference matmul (fp32: to fp32 rounding;
bf16: to bf16's) for zero points, symmetric weights, additive mins, act-order permutations, odd
shapes and group sizes 32 / 64 / 128 (and larger groups and per-channel scales, expressed at a
group the kernel takes); the weights it refuses. (A tiny AWQ model whose host layers run the kernel:
tests/test_host_forms.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.host_int4 import convert_layer, int4_linear, kernel_group, to_cpu_int4
from engine.quant.spec import QuantSpec, QuantWeight, dequantize, pack_codes
from tests.helpers import rel_max_err


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


def test_measured_int4_rate_is_positive_and_checks_its_arguments():
    from engine.host_int4 import measure_int4_gemv

    assert 0.0 < measure_int4_gemv(1, torch.bfloat16, group=64, nbytes=1 << 20, repeats=2, hidden=512) < 10_000.0
    with pytest.raises(ValueError, match="must be positive"):
        measure_int4_gemv(0, torch.bfloat16)
    with pytest.raises(ValueError, match="group divide hidden"):
        measure_int4_gemv(1, torch.bfloat16, group=96, hidden=512)


@pytest.mark.parametrize("lane,kernel", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                         (torch.float32, torch.float32)])
def test_the_int4_rate_is_measured_in_the_dtype_the_lane_runs_the_kernel_in(monkeypatch, lane, kernel):
    """An fp16 lane's int4 layers run in bf16 (convert_layer): its rate must be the bf16 kernel's (the fp16
    kernel read 1.2 GB/s on the H200 host against 55 for bf16, and the planner took widened layers)."""
    import engine.host_int4 as mod
    seen, real = [], mod.to_cpu_int4
    monkeypatch.setattr(mod, "to_cpu_int4", lambda w, dtype: seen.append(dtype) or real(w, dtype))
    calls = []
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu",
                        lambda x, *a, f=torch._weight_int4pack_mm_for_cpu: calls.append(x.dtype) or f(x, *a))
    mod.measure_int4_gemv(1, lane, group=64, nbytes=1 << 18, repeats=1, hidden=512)
    assert seen == [kernel] and set(calls) == {kernel}


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
    """Engine._host_rate: int4 layers held for the CPU int4 kernel get its rate under its own cache entry;
    full-precision ones the dense GEMV's (engine.host_forms: widened layers, tests/test_host_forms.py)."""
    import types

    import engine.engine as eng_mod
    from tests.test_host_forms import _cfg

    calls = []
    monkeypatch.setenv("LAYERSTREAM_HOST_WEIGHTS", "int4")
    monkeypatch.setattr(eng_mod, "run_pinned", lambda pick, fn, *a: fn(*a))
    monkeypatch.setattr(eng_mod, "machine_pick", lambda disk_tier: None)
    monkeypatch.setattr(eng_mod, "host_gemv_rate",
                        lambda batch, dtype, contend=None, form="", measure=None: calls.append((form, measure)) or (9.0, "x"))
    fake = types.SimpleNamespace(device=torch.device("cuda", 0), opts=types.SimpleNamespace(batch=1),
                                 dtype=torch.bfloat16, quant=_layer_quant(), cfg=_cfg())
    assert eng_mod.Engine._host_rate(fake, "auto") == (9.0, "x; host layers int4") and fake.host_weights == "int4"
    form, measure = calls[-1]
    assert form == "int4 g128 CPU kernel in bfloat16" and measure.keywords == {"group": 128}
    fake.quant = None
    assert eng_mod.Engine._host_rate(fake, "auto") == (9.0, "x")
    assert calls[-1] == ("", None) and len(calls) == 2  # the dense GEMV


@pytest.mark.parametrize("rows", [16, 1024, 3072])
def test_the_timed_int4_weight_is_one_converted_block_repeated(rows):
    """measure_int4_gemv's weight: the CPU kernel's form of a patterned block, repeated to ``rows`` (shapes as
    convert_layer makes them; the kernel runs on it)."""
    from engine.host_int4 import _tiled_cpu_int4, int4_linear, patterned_int4

    w = _tiled_cpu_int4(rows, 256, 64, torch.bfloat16)
    one = to_cpu_int4(patterned_int4(rows, 256, 64), torch.bfloat16)
    assert w.shape == (rows, 256) and w.packed.shape == one.packed.shape
    assert w.scales_and_zeros.shape == one.scales_and_zeros.shape and w.group == one.group
    assert int4_linear(torch.ones(1, 256, dtype=torch.bfloat16), w).shape == (1, rows)
