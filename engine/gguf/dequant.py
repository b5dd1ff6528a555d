"""Widening GGUF tensors to floats, in torch (vectorised over blocks).

ggml stores a quantized row as a run of fixed-size blocks; each block holds its own
scale(s) and packed integers (the layouts are those of ggml's ``block_q*`` structs, all
little-endian). Every decoder here takes the raw bytes of whole blocks as a ``[n, type_size]``
uint8 tensor and returns ``[n, block_size]`` float32 values, computed with the same
operation order as ggml's reference dequantizers (scale products first, then the integers).

Which formats exist (and their block geometry) comes from ``gguf.GGML_QUANT_SIZES``; the
decoders are in :data:`DECODERS`; those of the quantized types (Q4_K, Q5_K, Q6_K and the block-32
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) live in :mod:`kernels.ggml_blocks` (the references of the kernels that
read these blocks natively). A type without a decoder is rejected with a clear error by :func:`check_supported` before
any weight is read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from kernels.ggml_blocks import LEGACY, legacy_values, q4_k_values, q5_k_values, q6_k_values

CHUNK_VALUES = 1 << 20  # values widened per step: float32 temporaries of 4 MiB stay in cache (about 2x
# faster than 16M-value steps on one core) and bound the memory a large tensor needs beyond its output


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float32)


def _f16_t(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return b.view(torch.bfloat16).float()


DECODERS: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.F32: _f32, QT.F16: _f16_t, QT.BF16: _bf16,
    **{QT[name.upper()]: partial(legacy_values, qtype=name) for name in LEGACY},
    QT.Q4_K: q4_k_values, QT.Q5_K: q5_k_values, QT.Q6_K: q6_k_values,
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
