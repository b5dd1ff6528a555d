"""Format loaders (engine/quant/{awq,gptq,ct,config}.py) against packers that are not ours.

* compressed-tensors: the package's own compressor quantizes and packs the weight and its own
  decompressor gives the reference; the config is its own QuantizationConfig dump.
* AWQ: tests/quant_packers.py packs from the published layout (checked here on a known word);
  compressed-tensors' AutoAWQ converter + decompressor is the reference decode.
* GPTQ: tests/quant_packers.py packs from the published v1 layout (AutoGPTQ's pack: inputs along
  the words, zeros minus one along the outputs; checked here on known words); the reference is the
  weight computed directly from the codes with the g_idx gather, so act order is checked too.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

from engine.quant.config import load_quant_linear, parse_quantization_config  # noqa: E402
from engine.quant.spec import dequantize  # noqa: E402
from tests.quant_packers import awq_pack, gptq_pack_rows  # noqa: E402

P = "model.layers.0.mlp.down_proj"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _load(config: dict, tensors: dict[str, torch.Tensor], n: int, k: int):
    qc = parse_quantization_config({"quantization_config": config})
    return load_quant_linear(qc, P, tensors.get, n, k)


# ------------------------------------------------------------------ compressed-tensors ----

def _ct_scheme(bits: int, group: int, sym: bool) -> QuantizationScheme:
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, group_size=None if group == -1 else group,
                            strategy="channel" if group == -1 else "group")
    return QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (8, 32, False), (8, -1, True),
                                            (4, -1, False)])
def test_compressed_tensors_pack_quantized(bits: int, group: int, sym: bool, dtype: torch.dtype) -> None:
    n, k = 20, 128  # n not a multiple of 8: the packed zero points have a partial word
    g = k if group == -1 else group
    w = (torch.randn(n, k, generator=_gen(bits)) * 0.05).to(dtype)
    half = 1 << (bits - 1)
    scale = (w.float().reshape(n, k // g, g).abs().amax(-1) / (half - 1)).to(dtype)
    sd = {"weight": w, "weight_scale": scale}
    if not sym:
        sd["weight_zero_point"] = torch.randint(-2, 3, (n, k // g), generator=_gen(1), dtype=torch.int8)
    scheme = _ct_scheme(bits, group, sym)
    packed = PackedQuantizationCompressor.compress(sd, scheme)
    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized").model_dump()
    qw = _load(config, {f"{P}.{name}": t for name, t in packed.items()}, n, k)
    assert qw.spec.label == f"compressed-tensors int{bits} {'per-channel' if group == -1 else f'g{group}'}" \
        + (" sym" if sym else "")
    ref = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    torch.testing.assert_close(dequantize(qw).to(dtype), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- AWQ ----

def test_awq_packer_known_word() -> None:
    assert awq_pack(torch.arange(8).unsqueeze(0)).item() == 0x75316420


def _awq_checkpoint(n: int, k: int, g: int, seed: int = 0):
    codes = torch.randint(0, 16, (n, k), generator=_gen(seed))
    zeros = torch.randint(0, 16, (n, k // g), generator=_gen(seed + 1))
    scales = (torch.rand(n, k // g, generator=_gen(seed + 2)) * 0.01 + 0.001).half()
    tensors = {f"{P}.qweight": awq_pack(codes.T.contiguous()), f"{P}.qzeros": awq_pack(zeros.T.contiguous()),
               f"{P}.scales": scales.T.contiguous()}
    truth = (codes - zeros.repeat_interleave(g, 1)) * scales.float().repeat_interleave(g, 1)
    return tensors, truth


@pytest.mark.parametrize("n,k,g", [(24, 128, 32), (40, 192, 64), (16, 256, 128)])
def test_awq_gemm(n: int, k: int, g: int) -> None:
    tensors, truth = _awq_checkpoint(n, k, g)
    config = {"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm", "zero_point": True}
    qw = _load(config, tensors, n, k)
    assert qw.spec.label == f"awq int4 g{g}" and qw.nbytes < n * k  # packed: ~half a byte per weight
    torch.testing.assert_close(dequantize(qw), truth, rtol=1e-6, atol=1e-6)
    # compressed-tensors' own AutoAWQ converter and decompressor decode the same checkpoint alike
    conv = AutoAWQConverter.from_autoawq_config(config).process(dict(tensors))
    ct = {name.removeprefix(f"{P}."): t for name, t in conv.items()}
    ref = PackedQuantizationCompressor.decompress(ct, _ct_scheme(4, g, False))["weight"]
    torch.testing.assert_close(dequantize(qw).half(), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------- GPTQ ----

def test_gptq_packer_known_words() -> None:
    assert gptq_pack_rows(torch.arange(1, 9).unsqueeze(1), 4).item() == 0x87654321 - (1 << 32)
    assert gptq_pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() == 0xFF030201 - (1 << 32)


def _gptq_checkpoint(n: int, k: int, bits: int, g: int, sym: bool, act_order: bool, seed: int = 0):
    top = 1 << bits
    codes = torch.randint(0, top, (n, k), generator=_gen(seed))
    zeros = torch.full((n, k // g), top // 2) if sym else torch.randint(0, top, (n, k // g), generator=_gen(seed + 1))
    if not sym:
        zeros[0, 0] = 0  # stored as -1: v1 reads it back as 2**bits
    scales = (torch.rand(n, k // g, generator=_gen(seed + 2)) * 0.01 + 0.001).half()
    order = torch.randperm(k, generator=_gen(seed + 3)) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)  # channels quantized in `order`, G at a time
    stored = (zeros - 1) % top
    tensors = {f"{P}.qweight": gptq_pack_rows(codes.T.contiguous(), bits),
               f"{P}.qzeros": gptq_pack_rows(stored, bits).T.contiguous(),  # along the outputs
               f"{P}.scales": scales.T.contiguous(), f"{P}.g_idx": g_idx}
    read_zeros = stored + 1  # v1 semantics, including the 2**bits wrap
    gi = g_idx.long()
    truth = (codes - read_zeros[:, gi]) * scales.float()[:, gi]
    return tensors, truth


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,g,sym", [(4, 32, True), (4, 64, False), (8, 32, False), (8, -1, True), (4, -1, False)])
def test_gptq_v1(bits: int, g: int, sym: bool, act_order: bool) -> None:
    n, k = 32, 128
    tensors, truth = _gptq_checkpoint(n, k, bits, k if g == -1 else g, sym, act_order)
    config = {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": sym, "desc_act": act_order,
              "checkpoint_format": "gptq"}
    qw = _load(config, tensors, n, k)
    assert qw.spec.sym == sym and (qw.perm is not None) == (act_order and g != -1)
    torch.testing.assert_close(dequantize(qw), truth, rtol=1e-6, atol=1e-6)


def test_gptq_act_order_through_the_kernel() -> None:
    """The loaded act-order weight, run through the quantized GEMV (permuted x), equals x @ truth.T."""
    from kernels.qlinear import qlinear

    n, k = 24, 128
    tensors, truth = _gptq_checkpoint(n, k, 4, 32, False, True, seed=7)
    qw = _load({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True}, tensors, n, k)
    x = torch.randn(3, k, generator=_gen(8))
    out = qlinear(x, qw.qweight, qw.scales, qw.zeros, 4, perm=qw.perm)
    torch.testing.assert_close(out, x @ truth.T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- bad input ----

@pytest.mark.parametrize("config,match", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq with bits=3 is not supported"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "awq with bits=8"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size must be"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {"weights": {}}}},
     "format 'float-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float", "strategy": "group"}}}}, "type='float'"),
    # values of the wrong JSON type (each a traceback or a silently wrong reading before)
    ({"quant_method": "gptq", "bits": 4, "group_size": True}, "group_size must be a positive integer or -1, got True"),
    ({"quant_method": "gptq", "bits": 4, "sym": "false"}, "sym should be true or false, got 'false'"),
    ({"quant_method": "awq", "bits": 4, "zero_point": 1}, "zero_point should be true or false, got 1"),
    ({"quant_method": "awq", "bits": 4, "modules_to_not_convert": 1.5},
     "modules_to_not_convert should be a list of module names, got 1.5"),
    ({"quant_method": "compressed-tensors", "config_groups": True}, "config_groups should be an object, got True"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"format": "pack-quantized", "weights": 64}}},
     "config_groups.g.weights should be an object, got 64"),
    ("awq", "quantization_config should be an object"),
])
def test_unsupported_configs(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_quantization_config({"quantization_config": config})


def test_bad_tensors_name_the_tensor() -> None:
    n, k, g = 24, 128, 32
    awq = {"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm"}
    tensors, _ = _awq_checkpoint(n, k, g)
    with pytest.raises(ValueError, match=rf"{P}.qzeros: missing from the checkpoint; expected int32 \[4, 3\]"):
        _load(awq, {kk: v for kk, v in tensors.items() if not kk.endswith("qzeros")}, n, k)
    with pytest.raises(ValueError, match=rf"{P}.scales: expected float16 or bfloat16 \[4, 24\]"):
        _load(awq, {**tensors, f"{P}.scales": tensors[f"{P}.scales"][:, :8]}, n, k)
    with pytest.raises(ValueError, match=rf"{P}.qweight: expected int32 \[128, 3\]"):
        _load(awq, {**tensors, f"{P}.qweight": tensors[f"{P}.qweight"][:64]}, n, k)
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 128"):
        _load({**awq, "group_size": 48}, tensors, n, k)
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": True}
    tensors, _ = _gptq_checkpoint(n, k, 4, g, False, True)
    bad = tensors[f"{P}.g_idx"].clone()
    bad[0] = bad[1] = 0
    bad[2] = 3
    with pytest.raises(ValueError, match=rf"{P}.g_idx: expected each of the 4 groups to hold 32 input channels"):
        _load(gptq, {**tensors, f"{P}.g_idx": bad}, n, k)
