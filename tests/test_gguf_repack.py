"""GGUF blocks repacked into the engine's canonical quantized weight (``engine.gguf.repack``), against
the gguf package's numpy dequantizer (``gguf.quants.dequantize``).

For every block type the canonical weight (its own narrowest form, and the wider forms a model that
mixes it with other types uses) dequantizes, through ``engine.quant.spec.dequantize`` (the torch
path) and ``kernels.quant_common.dequant_ref`` (the kernels' fp32 reference), to the package's
values bit for bit; blocks are random bytes (every bit pattern the formats allow, finite scales).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as np_dequantize

from engine.gguf.dequant import block_geometry
from engine.gguf.repack import NATIVE, target_for, to_canonical
from engine.quant.spec import dequantize
from kernels.quant_common import dequant_ref
from tests.test_gguf_dequant import QUANTIZED, random_blocks

# partners that force each wider form: int8 codes, group 16, additive mins, fp32 scales
PARTNERS = [None, QT.Q8_0, QT.Q6_K, QT.Q4_1, QT.Q4_K]


@pytest.mark.parametrize("partner", PARTNERS, ids=lambda t: "alone" if t is None else f"with-{t.name}")
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (7, 3)], ids=["1block", "3x2", "7x3"])
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_canonical_weight_equals_gguf_dequantize(qtype, shape, partner):
    raw = random_blocks(qtype, *shape, seed=int(qtype) * 31 + shape[0])
    want = torch.from_numpy(np_dequantize(raw, qtype).astype(np.float32))
    target = target_for({qtype} | ({partner} if partner else set()))
    qw = to_canonical(torch.from_numpy(raw.copy()).view(-1), qtype, shape[0], target)
    qw.check(qtype.name)
    assert qw.shape == tuple(want.shape)
    got = dequantize(qw)
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max():.3e}"
    assert torch.equal(dequant_ref(qw.qweight, qw.scales, qw.zeros, qw.spec.bits, qw.mins), want)


@pytest.mark.parametrize("types,want", [
    ({QT.Q4_0}, (4, 32, False, torch.float16)), ({QT.Q8_0}, (8, 32, False, torch.float16)),
    ({QT.Q5_0, QT.Q8_0}, (8, 32, False, torch.float16)), ({QT.Q4_1}, (4, 32, True, torch.float16)),
    ({QT.Q5_1}, (8, 32, True, torch.float16)), ({QT.Q4_1, QT.Q8_0}, (8, 32, True, torch.float32)),
    ({QT.Q4_K}, (4, 32, True, torch.float32)), ({QT.Q6_K}, (8, 16, False, torch.float32)),
    ({QT.Q4_K, QT.Q6_K}, (8, 16, True, torch.float32)), ({QT.Q5_K, QT.Q6_K}, (8, 16, True, torch.float32)),
])
def test_target_is_the_narrowest_exact_form(types, want):
    t = target_for(types)
    assert (t.spec.bits, t.spec.group_size, t.spec.mins, t.scale_dtype) == want
    assert t.spec.sym and t.spec.fmt == "gguf"


@pytest.mark.parametrize("types", [{QT.F16}, {QT.Q4_K, QT.F32}, {QT.BF16, QT.Q8_0}, set()])
def test_float_layers_have_no_packed_form(types):
    assert target_for(types) is None


def test_bits_per_weight_of_the_native_forms():
    """Stored bits per weight of a 256-wide row in each type's own form (codes + group scales / mins)."""
    want = {QT.Q8_0: 8.5, QT.Q4_0: 4.5, QT.Q5_0: 8.5, QT.Q4_1: 5.0, QT.Q5_1: 9.0, QT.Q4_K: 6.0,
            QT.Q5_K: 10.0, QT.Q6_K: 10.0}
    assert set(want) == set(NATIVE)
    for qtype, bpw in want.items():
        raw = random_blocks(qtype, 2, 256 // block_geometry(qtype)[0], seed=1)
        qw = to_canonical(torch.from_numpy(raw.copy()).view(-1), qtype, 2, target_for({qtype}))
        assert qw.nbytes * 8 / qw.qweight.shape[0] / qw.in_features == bpw, qtype.name
