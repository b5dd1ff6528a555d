"""ggml's quantized blocks ("native ggml form"): geometry and the fp32 torch reference decoders.

A GGUF tensor row of K values is K / 256 consecutive K-quant super-blocks (ggml's ``block_q4_K`` /
``block_q5_K`` / ``block_q6_K`` structs, little-endian, no padding):

* Q4_K, 144 bytes: fp16 ``d`` (byte 0), fp16 ``dmin`` (byte 2), 12 bytes packing 8 six-bit scales
  and 8 six-bit mins (byte 4), 128 bytes of nibbles (byte 16). Sub-block j (32 values) is
  ``y = (d * sc_j) * q - (dmin * m_j)``; byte run i (32 bytes) holds sub-block 2i in its low
  nibbles and 2i + 1 in its high ones.
* Q5_K, 176 bytes: Q4_K's ``d``, ``dmin`` and 12 scale bytes, then 32 bytes ``qh`` (byte 16: bit j of
  ``qh[l]`` is the fifth bit of value l of sub-block j), then Q4_K's 128 nibble bytes (byte 48);
  codes 0..31, same affine decode.
* Q6_K, 210 bytes: ``ql`` (128 bytes of low nibbles), ``qh`` (64 bytes of 2-bit highs), 16 int8
  scales (byte 192), fp16 ``d`` (byte 208); ``y = (d * sc_{e // 16}) * (q - 32)``.

or K / 32 consecutive "legacy" blocks of 32 values (:data:`LEGACY`): fp16 ``d`` (byte 0), for the
``_1`` types fp16 ``m`` (byte 2), for the 5-bit ones 4 bytes ``qh`` (bit l of the little-endian
word is the fifth bit of value l), then the codes: Q8_0 32 int8 (``y = d * q``), the others 16
bytes of nibbles, low nibbles values 0..15, high ones 16..31 (``y = d * (q - 8)`` Q4_0,
``d * (q - 16)`` Q5_0, ``d * q + m`` Q4_1 / Q5_1).  K need not be a multiple of 256.

The decoders take whole blocks as a ``[n, bytes]`` uint8 tensor and return ``[n, 256]`` (``[n, 32]``)
values with ggml's operation order (scale products first, then the integers); they serve both the
kernels' references here and the engine's GGUF widening (``engine.gguf.dequant``).
Plain torch, no Triton.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch


class Legacy(NamedTuple):
    """Byte layout of a block-32 type: where its codes (``qs``) and fifth bits (``qh``, 0: none) start,
    its code bits, whether it stores an fp16 min at byte 2, and the offset its codes are read from."""

    qs: int
    qh: int
    bits: int
    mins: bool
    offset: int


LEGACY: dict[str, Legacy] = {"q8_0": Legacy(2, 0, 8, False, 0), "q4_0": Legacy(2, 0, 4, False, 8),
                             "q4_1": Legacy(4, 0, 4, True, 0), "q5_0": Legacy(6, 2, 5, False, 16),
                             "q5_1": Legacy(8, 4, 5, True, 0)}
BLOCKS: dict[str, tuple[int, int]] = {  # values, bytes
    "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
    **{name: (32, lay.qs + (32 if lay.bits == 8 else 16)) for name, lay in LEGACY.items()}}


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one row of ``k`` values stored as ``qtype`` blocks."""
    if qtype not in BLOCKS:
        raise ValueError(f"unknown ggml block type {qtype!r}; expected one of {sorted(BLOCKS)}")
    values, size = BLOCKS[qtype]
    if k <= 0 or k % values:
        raise ValueError(f"{qtype} rows hold whole blocks of {values} values; K={k} is not a positive multiple")
    return k // values * size


def f16_field(b: torch.Tensor, byte: int) -> torch.Tensor:
    """The fp16 field at byte offset ``byte`` of each block, as [n, 1] float32 (no copy of the blocks:
    every block size is even, so the rows view as fp16 directly)."""
    return b.view(torch.float16)[:, byte // 2:byte // 2 + 1].float()


def i8_fields(b: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Bytes start..end of each block read as int8, in float32."""
    return b.view(torch.int8)[:, start:end].float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] ints: the 16 low nibbles, then the 16 high ones (ggml's q4/q5 order)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K block -> 8 six-bit scales and 8 six-bit mins (ggml's
    ``get_scale_min_k4``: j < 4 in the low 6 bits of bytes j / j + 4, j >= 4 split over a nibble of
    byte j + 4 and the top 2 bits of byte j - 4 / j)."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([s0 & 63, (s2 & 0xF) | ((s0 >> 6) << 4)], dim=-1)
    mins = torch.cat([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], dim=-1)
    return scales, mins


def k_affine_(b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = d * scale_j * q - dmin * min_j over the 8 sub-blocks of 32 of Q4_K/Q5_K blocks, as [n, 256]
    float32, computed in place on the codes ``y`` (float32 [n, 8, 32]): no [n, 256] temporaries, which
    were most of the plain-torch decode's time on the CPU."""
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    scales, mins = k_scales(b[:, 4:16])
    return y.mul_((d * scales.float()).unsqueeze(-1)).sub_((dmin * mins.float()).unsqueeze(-1)).flatten(1)


def q4_k_ints(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: byte run i holds sub-block 2i (low nibbles) and 2i+1 (high)."""
    runs = qs.view(-1, 4, 32)
    return torch.stack([runs & 0xF, runs >> 4], dim=2).view(-1, 8, 32)


def q5_k_ints(b: torch.Tensor) -> torch.Tensor:
    """Q5_K blocks [n, 176] -> [n, 8, 32] 5-bit codes: Q4_K's nibbles (byte 48) plus bit j of qh[l]
    (byte 16) as bit 4 of value l of sub-block j."""
    bit = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    high = (b[:, 16:48].unsqueeze(1) >> bit) & 1
    return q4_k_ints(b[:, 48:176]) | (high << 4)


def q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [n, 210] -> their unsigned 6-bit codes [n, 256] (uint8, value order; q - 32 is the int)."""
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    low = torch.cat([ql & 0xF, ql >> 4], dim=-1)  # per half: 4 runs of 32
    high = (qh.unsqueeze(2) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)) & 3
    return (low | (high.flatten(2) << 4)).flatten(1)


def q4_k_values(b: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks [n, 144] -> [n, 256] float32."""
    runs = b[:, 16:144].view(-1, 4, 32)
    y = torch.empty(b.shape[0], 4, 2, 32, dtype=torch.float32, device=b.device)
    y[:, :, 0] = runs & 0xF  # the codes go straight into the float result (q4_k_ints' order)
    y[:, :, 1] = runs >> 4
    return k_affine_(b, y.view(-1, 8, 32))


def q5_k_values(b: torch.Tensor) -> torch.Tensor:
    """Q5_K blocks [n, 176] -> [n, 256] float32."""
    return k_affine_(b, q5_k_ints(b).float())


def q6_k_values(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks [n, 210] -> [n, 256] float32."""
    q = q6_k_codes(b).float().view(-1, 16, 16).sub_(32.0)
    return q.mul_((f16_field(b, 208) * i8_fields(b, 192, 208)).unsqueeze(-1)).flatten(1)


def fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes -> [n, 32] bits: bit l of the little-endian 32-bit word (a Q5_0 / Q5_1 ``qh``)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def legacy_codes(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """Blocks [n, bytes] of a :data:`LEGACY` type -> its 32 codes a block, uint8 [n, 32] in value order
    (Q8_0: the int8 bytes as stored; the others unsigned, the offset or min not applied)."""
    lay = LEGACY[qtype]
    if lay.bits == 8:
        return b[:, lay.qs:lay.qs + 32]
    q = nibbles(b[:, lay.qs:lay.qs + 16])
    return q | (fifth_bits(b[:, lay.qh:lay.qh + 4]) << 4) if lay.bits == 5 else q


def legacy_values(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """Blocks [n, bytes] of a :data:`LEGACY` type -> [n, 32] float32 (ggml: ``(q - offset) * d`` or
    ``q * d + m``)."""
    lay = LEGACY[qtype]
    q = legacy_codes(b, qtype)
    y = q.view(torch.int8).float() if lay.bits == 8 else q.float()
    # scaled in place: no further [n, 32] temporaries (most of the plain-torch decode's time on the CPU)
    if lay.offset:
        y.sub_(lay.offset)
    y.mul_(f16_field(b, 0))
    return y.add_(f16_field(b, 2)) if lay.mins else y


_DECODE = {"q4_k": q4_k_values, "q5_k": q5_k_values, "q6_k": q6_k_values,
           **{name: partial(legacy_values, qtype=name) for name in LEGACY}}


def dequant_ref(blocks: torch.Tensor, qtype: str, k: int) -> torch.Tensor:
    """fp32 [N, k] values of ``blocks`` (uint8 [N, row_bytes(qtype, k)]: each row the bytes of one
    GGUF tensor row), as ggml's reference dequantizers compute them."""
    size = row_bytes(qtype, k)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != size:
        raise ValueError(f"{qtype} blocks for K={k} must be uint8 [N, {size}], "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    n = blocks.shape[0]
    per_block = blocks.contiguous().view(-1, BLOCKS[qtype][1])
    return _DECODE[qtype](per_block).view(n, k)
