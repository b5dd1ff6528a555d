"""Tests for the canonical quantized weight (engine/quant/spec.py) and the RTN quantizer
(engine/quant/rtn.py): packing against compressed-tensors' packer and a hand-computed word,
validation messages, dequantization with an act-order permutation, RTN error bounds."""
from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from engine.quant.rtn import quantize_rtn
from engine.quant.spec import QuantSpec, QuantWeight, check_canonical, dequantize, pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows,cols", [(1, 8), (5, 64), (3, 200)])
def test_pack_matches_compressed_tensors(bits: int, rows: int, cols: int) -> None:
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=torch.Generator().manual_seed(rows))
    ours = pack_codes(codes, bits)
    assert ours.dtype == torch.int32 and ours.shape == (rows, cols * bits // 32)
    assert torch.equal(ours, pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits))
    assert torch.equal(unpack_codes(ours, bits), codes.to(torch.uint8))


def test_pack_known_word() -> None:
    # column i of the word in bits 4i: 0x87654321 has codes 1..8; the top nibble makes it negative
    assert pack_codes(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).item() == 0x87654321 - (1 << 32)
    assert pack_codes(torch.tensor([[0x01, 0x80, 0xFF, 0x10]]), 8).item() == 0x10FF8001


def test_spec_validation_and_label() -> None:
    assert QuantSpec(4, 128, False, "awq").label == "awq int4 g128"
    assert QuantSpec(8, -1, True, "gptq").label == "gptq int8 per-channel sym"
    with pytest.raises(ValueError, match="unsupported bit width 3"):
        QuantSpec(3, 128, False, "gptq")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(4, 0, False, "gptq")


def test_check_canonical_names_the_tensor() -> None:
    spec = QuantSpec(4, 32, False, "rtn")
    q = torch.zeros(4, 8, dtype=torch.int32)
    s = torch.ones(4, 2, dtype=torch.float16)
    check_canonical("m.w", q, s, s.clone(), None, spec, 64)
    with pytest.raises(ValueError, match=r"m.w.scales: expected float16 or bfloat16 or float32 \[4, 2\]"):
        check_canonical("m.w", q, s.double(), None, None, QuantSpec(4, 32, True, "rtn"), 64)
    mins_spec = QuantSpec(4, 32, True, "gguf", mins=True)
    check_canonical("m.w", q, s.float(), None, None, mins_spec, 64, mins=s.float())
    with pytest.raises(ValueError, match="mins missing"):
        check_canonical("m.w", q, s, None, None, mins_spec, 64)
    with pytest.raises(ValueError, match=r"m.w.mins: expected float16 \[4, 2\]"):
        check_canonical("m.w", q, s, None, None, mins_spec, 64, mins=s.float())
    with pytest.raises(ValueError, match="must be sym"):
        QuantSpec(4, 32, False, "gguf", mins=True)
    with pytest.raises(ValueError, match="zeros missing"):
        check_canonical("m.w", q, s, None, None, spec, 64)
    with pytest.raises(ValueError, match="group size 48 does not divide in_features 64"):
        check_canonical("m.w", q, s, s, None, QuantSpec(4, 48, False, "rtn"), 64)
    with pytest.raises(ValueError, match=r"m.w.perm: expected int32 \[64\]"):
        check_canonical("m.w", q, s, s, torch.arange(64), spec, 64)


def test_dequantize_with_mins_known_values() -> None:
    # w = code * scale + min: codes 0..7, G = 4, scales (0.5, 2), mins (-1, 0.25)
    q = pack_codes(torch.arange(8).unsqueeze(0), 4)
    s = torch.tensor([[0.5, 2.0]])
    m = torch.tensor([[-1.0, 0.25]])
    w = QuantWeight(q, s, None, None, QuantSpec(4, 4, True, "gguf", mins=True), 8, m)
    w.check()
    assert w.spec.label == "gguf int4 g4 +min" and w.nbytes == 4 + 8 + 8
    expect = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 8.25, 10.25, 12.25, 14.25]])
    assert torch.equal(dequantize(w), expect)


def test_dequantize_known_values_and_perm() -> None:
    # one row, K = 8, G = 4: codes 0..7, zeros (1, 2), scales (0.5, 2)
    q = pack_codes(torch.arange(8).unsqueeze(0), 4)
    s = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    z = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    w = QuantWeight(q, s, z, None, QuantSpec(4, 4, False, "rtn"), 8)
    expect = torch.tensor([[-0.5, 0.0, 0.5, 1.0, 4.0, 6.0, 8.0, 10.0]])
    assert torch.equal(dequantize(w), expect)
    perm = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.int32)
    wp = QuantWeight(q, s, z, perm, w.spec, 8)
    assert torch.equal(dequantize(wp), expect.flip(1))
    sym = QuantWeight(q, s, None, None, QuantSpec(4, 4, True, "rtn"), 8)
    assert torch.equal(dequantize(sym), torch.tensor([[-4.0, -3.5, -3.0, -2.5, -8.0, -6.0, -4.0, -2.0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 32, True), (8, 128, True), (8, -1, False),
                                            (4, 64, False)])
def test_rtn_error_bound(bits: int, group: int, sym: bool, dtype: torch.dtype) -> None:
    w = (torch.randn(37, 256, generator=torch.Generator().manual_seed(bits + group)) * 0.02).to(dtype)
    qw = quantize_rtn(w, bits, group, sym)
    g = 256 if group == -1 else group
    assert qw.scales.shape == (37, 256 // g) and (qw.zeros is None) == sym
    assert qw.scales.dtype == (dtype if dtype != torch.float32 else torch.float16)
    err = (dequantize(qw) - w.float()).abs()
    # half a step; asymmetric: the rounded zero point can clip a group's extreme by another half step
    bound = qw.scales.float().repeat_interleave(g, dim=1) * (0.5 if sym else 1.0) * (1 + 1e-3)
    assert bool((err <= bound).all()), float((err - bound).max())
    rel = (dequantize(qw) - w.float()).norm() / w.float().norm()
    assert rel < (0.12 if bits == 4 else 0.008)


def test_rtn_bad_input() -> None:
    with pytest.raises(ValueError, match="group size 96 .* must divide in_features 128"):
        quantize_rtn(torch.randn(4, 128), 4, 96)
    with pytest.raises(ValueError, match="unsupported bit width 2"):
        quantize_rtn(torch.randn(4, 128), 2, 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(128), 4, 32)
