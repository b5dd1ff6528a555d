"""Widening GGUF tensors to floats, in torch (vectorised over blocks).

ggml stores a quantized row as a run of fixed-size blocks; each block holds its own
scale(s) and packed integers (the layouts are those of ggml's ``block_q*`` structs, all
little-endian). Every decoder here takes the raw bytes of whole blocks as a ``[n, type_size]``
uint8 tensor and returns ``[n, block_size]`` float32 values, computed with the same
operation order as ggml's reference dequantizers (scale products first, then the integers).

Which formats exist (and their block geometry) comes from ``gguf.GGML_QUANT_SIZES``; the
decoders are in :data:`DECODERS`. A type without a decoder is rejected with a clear error by
:func:`check_supported` before any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

CHUNK_VALUES = 1 << 20  # values widened per step: float32 temporaries of 4 MiB stay in cache (about 2x
# faster than 16M-value steps on one core) and bound the memory a large tensor needs beyond its output


def _f16(b: torch.Tensor, byte: int) -> torch.Tensor:
    """The fp16 scale at byte offset ``byte`` of each block, as [n, 1] float32 (no copy of the blocks:
    every block size is even, so the rows view as fp16 directly)."""
    return b.view(torch.float16)[:, byte // 2:byte // 2 + 1].float()


def _i8(b: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return b.view(torch.int8)[:, start:end].float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] ints: the 16 low nibbles, then the 16 high ones (ggml's q4/q5 order)."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _bits(raw: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8k] bits, bit j of the little-endian word at column j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((raw.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d, q = _f16(b, 0), _nibbles(b[:, 2:18])
    return (q.float() - 8.0) * d


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m, q = _f16(b, 0), _f16(b, 2), _nibbles(b[:, 4:20])
    return q.float() * d + m


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d, high, q = _f16(b, 0), _bits(b[:, 2:6]), _nibbles(b[:, 6:22])
    return ((q | (high << 4)).float() - 16.0) * d


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m, high, q = _f16(b, 0), _f16(b, 2), _bits(b[:, 4:8]), _nibbles(b[:, 8:24])
    return (q | (high << 4)).float() * d + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return _i8(b, 2, 34) * _f16(b, 0)


def k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K block -> 8 six-bit scales and 8 six-bit mins."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([s0 & 63, (s2 & 0xF) | ((s0 >> 6) << 4)], dim=-1)
    mins = torch.cat([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], dim=-1)
    return scales, mins


def _k_affine(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """y = d * scale_j * q - dmin * min_j over 8 sub-blocks of 32 (q: [n, 8, 32])."""
    d, dmin = _f16(b, 0), _f16(b, 2)
    scales, mins = k_scales(b[:, 4:16])
    y = (d * scales.float()).unsqueeze(-1) * q.float() - (dmin * mins.float()).unsqueeze(-1)
    return y.flatten(1)


def _q4_k_ints(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: byte run i holds sub-block 2i (low nibbles) and 2i+1 (high)."""
    runs = qs.view(-1, 4, 32)
    return torch.stack([runs & 0xF, runs >> 4], dim=2).view(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_affine(b, _q4_k_ints(b[:, 16:144]))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    qh = b[:, 16:48]  # bit j of qh[l] is the fifth bit of element l of sub-block j
    high = (qh.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)) & 1
    return _k_affine(b, _q4_k_ints(b[:, 48:176]) | (high << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    scales, d = _i8(b, 192, 208), _f16(b, 208)
    low = torch.cat([ql & 0xF, ql >> 4], dim=-1)  # per half: 4 runs of 32
    high = (qh.unsqueeze(2) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
    q = (low | (high.flatten(2) << 4)).float().view(-1, 16, 16) - 32.0
    return ((d * scales).unsqueeze(-1) * q).flatten(1)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)


def _f16_t(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.bfloat16).float()


DECODERS: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.F32: _f32, QT.F16: _f16_t, QT.BF16: _bf16, QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0, QT.Q5_1: _q5_1, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
}
PLAIN = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}  # stored as floats already


def check_supported(qtype: QT, tensor: str, source: str) -> None:
    """ValueError naming the type and the supported ones when ``qtype`` has no decoder."""
    if qtype not in DECODERS:
        names = ", ".join(t.name for t in DECODERS)
        raise ValueError(f"{source}: tensor {tensor!r} has type {qtype.name}, which this engine cannot read "
                         f"(supported: {names}); use a GGUF quantized to one of those (e.g. Q4_K_M or Q8_0)")


def block_geometry(qtype: QT) -> tuple[int, int]:
    """(values per block, bytes per block) of ``qtype``."""
    return GGML_QUANT_SIZES[qtype]


def dequantize(raw: torch.Tensor, qtype: QT, out: torch.Tensor) -> torch.Tensor:
    """Widen the blocks in ``raw`` (uint8, whole blocks) into ``out`` (any float dtype, numel = values).

    Works in chunks of :data:`CHUNK_VALUES` values so float32 temporaries stay small.
    """
    block, size = block_geometry(qtype)
    assert raw.dtype == torch.uint8 and raw.numel() % size == 0, (raw.dtype, raw.numel(), size)
    blocks = raw.reshape(-1, size)
    flat = out.view(-1)
    assert flat.numel() == blocks.shape[0] * block, (flat.numel(), blocks.shape[0], block)
    decode = DECODERS[qtype]
    step = max(1, CHUNK_VALUES // block)
    for start in range(0, blocks.shape[0], step):
        part = blocks[start:start + step]
        flat[start * block:(start + part.shape[0]) * block].copy_(decode(part).reshape(-1))
    return out
