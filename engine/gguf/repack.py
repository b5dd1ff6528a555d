"""GGUF quantized blocks -> the engine's canonical packed weight (``engine.quant.spec``), without widening.

Every supported block type is first split into its *native* parts: unsigned integer codes, one
fp32 scale per group of the block and either a constant offset (``w = (u - offset) * scale``:
Q8_0, Q4_0, Q5_0, Q6_K) or an additive fp32 minimum per group (``w = u * scale + min``: Q4_1, Q5_1,
Q4_K, Q5_K). The scales are the values ggml's dequantizers multiply by (for K-quants the super-block
``d`` times the 6-bit sub-block scale, a product fp32 holds exactly and fp16 does not).

A :class:`GGUFTarget` is the canonical form one model's layers are held in (one per model: every
layer shares one layout). :func:`target_for` picks the narrowest form that holds all of a model's
layer types exactly: bits = the widest code (int4 for 4-bit codes, int8 for 5-, 6- and 8-bit ones:
the kernels have no int5 / int6), group = the smallest block group (16 for Q6_K, else 32), the
additive-min form as soon as one type needs it (a type with an offset then stores ``-offset * scale``
as its min, exact in fp32), fp32 scales where fp16 would round them. Converting a native weight to the
target (:func:`to_canonical`) only re-packs codes, repeats group values and casts exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QT

from engine.gguf.dequant import block_geometry
from engine.quant.spec import QuantSpec, QuantWeight, pack_codes
from kernels.ggml_blocks import (LEGACY, f16_field as _f16, i8_fields, k_scales, legacy_codes, q4_k_ints as _q4_k_ints,
                                 q5_k_ints, q6_k_codes)


@dataclass(frozen=True)
class Native:
    """One type's canonical needs: code bits, group, additive mins, scales that need fp32."""

    bits: int
    group: int
    mins: bool
    fp32: bool


NATIVE = {QT.Q8_0: Native(8, 32, False, False), QT.Q4_0: Native(4, 32, False, False),
          QT.Q5_0: Native(5, 32, False, False), QT.Q4_1: Native(4, 32, True, False),
          QT.Q5_1: Native(5, 32, True, False), QT.Q4_K: Native(4, 32, True, True),
          QT.Q5_K: Native(5, 32, True, True), QT.Q6_K: Native(6, 16, False, True)}


@dataclass(frozen=True)
class GGUFTarget:
    """The canonical form of a model's layer weights: its spec and scale dtype."""

    spec: QuantSpec
    scale_dtype: torch.dtype


def target_for(qtypes: set[QT]) -> GGUFTarget | None:
    """The exact canonical form for layers of these types; None when one is a float type (F32 /
    F16 / BF16: no packed form holds it, the layers then stay widened as before)."""
    if not qtypes or any(t not in NATIVE for t in qtypes):
        return None
    natives = [NATIVE[t] for t in qtypes]
    bits = 4 if all(n.bits == 4 for n in natives) else 8
    mins = any(n.mins for n in natives)
    # fp16 holds d and m of the legacy types; -offset * d (a min stored for an offset type) may not fit it
    fp32 = any(n.fp32 for n in natives) or (mins and not all(n.mins for n in natives))
    spec = QuantSpec(bits, min(n.group for n in natives), True, "gguf", mins)
    return GGUFTarget(spec, torch.float32 if fp32 else torch.float16)


# 4-bit types: (first, end) byte of the packed nibbles in a block, and ggml's nibble run length (a run of
# ``run`` bytes holds ``run`` values in its low nibbles, then the next ``run`` in its high nibbles)
NIBBLE_RUNS = {QT.Q4_0: (2, 18, 16), QT.Q4_1: (4, 20, 16), QT.Q4_K: (16, 144, 32)}


def _nibble_runs(qs: torch.Tensor, run: int) -> torch.Tensor:
    """ggml's nibble runs [n, bytes] -> the same values as canonical int4 bytes (value 2c in the low
    nibble of byte c, 2c + 1 in the high one), shuffled byte-wise without unpacking."""
    r = qs.reshape(qs.shape[0], -1, run)
    even, odd = r[..., 0::2], r[..., 1::2]
    return torch.cat([(even & 0xF) | (odd << 4), (even >> 4) | (odd & 0xF0)], dim=-1).flatten(1)


def _legacy(b: torch.Tensor, qtype: QT, codes: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | int]:
    """Q8_0 / Q4_x / Q5_x blocks [n, size] -> (codes [n, 32] or None, scale [n, 1], offset or min [n, 1])."""
    name = qtype.name.lower()
    lay = LEGACY[name]
    q = legacy_codes(b, name) if codes else None
    if lay.bits == 8:  # int8 q -> q + 128
        return None if q is None else q ^ 0x80, _f16(b, 0), 128
    return q, _f16(b, 0), _f16(b, 2) if lay.mins else lay.offset


def _k_quant(b: torch.Tensor, qtype: QT, codes: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | int]:
    """Q4_K / Q5_K / Q6_K blocks -> (codes [n, 256] or None, scales [n, 8 or 16], mins [n, 8] or offset 32)."""
    if qtype == QT.Q6_K:
        scales = _f16(b, 208) * i8_fields(b, 192, 208)
        return q6_k_codes(b) if codes else None, scales, 32
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = k_scales(b[:, 4:16])
    if not codes:
        q = None
    elif qtype == QT.Q4_K:
        q = _q4_k_ints(b[:, 16:144])
    else:
        assert qtype == QT.Q5_K, qtype
        q = q5_k_ints(b)
    return None if q is None else q.flatten(1), d * sc.float(), -(dmin * mn.float())


def native_parts(raw: torch.Tensor, qtype: QT, rows: int,
                 codes: bool = True) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | int]:
    """Raw blocks of ``rows`` rows -> (uint8 codes [rows, K] (None without ``codes``), fp32 scales
    [rows, K / g], and the offset (an int) or fp32 mins [rows, K / g]), g the type's native group."""
    assert qtype in NATIVE, qtype
    block, size = block_geometry(qtype)
    blocks = raw.reshape(-1, size)
    split = _k_quant if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K) else _legacy
    q, scales, off = split(blocks, qtype, codes)
    off = off if isinstance(off, int) else off.reshape(rows, -1)
    return None if q is None else q.reshape(rows, -1), scales.reshape(rows, -1), off


def _int4_words(raw: torch.Tensor, qtype: QT, rows: int) -> torch.Tensor:
    """The canonical int4 words [rows, K / 8] of a 4-bit type's blocks (its codes unchanged)."""
    start, end, run = NIBBLE_RUNS[qtype]
    blocks = raw.reshape(-1, block_geometry(qtype)[1])
    return _nibble_runs(blocks[:, start:end], run).reshape(rows, -1).contiguous().view(torch.int32)


def to_canonical(raw: torch.Tensor, qtype: QT, rows: int, target: GGUFTarget) -> QuantWeight:
    """The canonical weight (``target``'s spec and scale dtype) of a GGUF tensor's raw blocks
    (``rows`` rows, each a whole number of blocks): exactly the values ggml's dequantizer gives."""
    spec, dt = target.spec, target.scale_dtype
    codes, scales, off = native_parts(raw, qtype, rows, codes=spec.bits != 4)
    rep = NATIVE[qtype].group // spec.group_size
    mins = None
    if spec.mins:
        mins = -off * scales if isinstance(off, int) else off
        mins = mins.repeat_interleave(rep, dim=1).to(dt)
    else:
        assert isinstance(off, int), (qtype, spec)
    if spec.bits == 4:  # only 4-bit types here (Q4_0's offset 8 is the int4 zero point)
        assert spec.mins or off == 8, (qtype, spec)
        qweight = _int4_words(raw, qtype, rows)
    else:
        shift = 0 if spec.mins else (1 << (spec.bits - 1)) - off  # symmetric: the zero point is 2**(bits-1)
        qweight = pack_codes(codes + shift, spec.bits)
    k = qweight.shape[1] * spec.pack
    return QuantWeight(qweight, scales.repeat_interleave(rep, dim=1).to(dt), None, None, spec, k, mins)
