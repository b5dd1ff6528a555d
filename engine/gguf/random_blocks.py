"""Random GGUF blocks with a valid structure, for synthetic files (no floats to quantize).

A block is filled with random bytes (codes, and for Q5/Q6 their high bits), then its scale fields
are overwritten with values drawn so that the decoded weights have root-mean-square ``std``:

* every fp16 ``d`` is ``d0 * u`` with ``u`` uniform in [0.75, 1.25], ``d0`` solved from the mean
  square of the decoded codes: finite and positive, a normal fp16 at the default std 0.02, and for a
  std down to about 1e-3 at least 2**-18 (fp16 subnormals hold that within 1 %);
* Q4_1 / Q5_1 store ``m = -center * d`` and Q4_K / Q5_K ``dmin = center * d`` with each sub-block's
  6-bit min equal to its 6-bit scale, so every group is centred on zero (as trained weights are);
* K-quant sub-block scales: 6-bit values in 8..31 (Q4_K / Q5_K), int8 values of magnitude 4..15 and
  random sign (Q6_K, whose scales are signed as llama.cpp writes them).

* Q4_0, Q5_0 and Q8_0 (no min field): the one code without a mirror image about the zero point (0, 0,
  -128) becomes the zero point, so every block is centred. Left alone, that half-step offset (Q4_0:
  -0.11 std, the same sign in every weight) grows through a model's residual stream: the synthetic AWQ
  7B, whose int4 codes had it, overflowed fp16 (bench/results/2026-12-03-cpu-awq-fp16/).
The layouts are the decoders' in :mod:`engine.gguf.dequant` (packers shared with ``quantize``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import prod, sqrt

import torch
from gguf import GGMLQuantizationType as QT

from engine.gguf.dequant import PLAIN, block_geometry
from engine.gguf.quantize import f16_bytes, pack_k_scales
from kernels.ggml_blocks import fifth_bits

CHUNK_BYTES = 32 << 20  # bytes generated per step: bounds the memory a large tensor needs
_U_LO, _U_HI = 0.75, 1.25  # range of d / d0
_U_MS = 1 + (_U_HI - _U_LO) ** 2 / 12  # E[u^2]
_D_MIN = 2.0 ** -18  # smallest d drawn: fp16's subnormal step (2**-24) is then under 1 / 64 of it


def _uniform_ms(levels: int, offset: float) -> float:
    """Mean square of ``q - offset`` for q uniform over the integers 0 .. levels - 1."""
    return (levels ** 2 - 1) / 12 + ((levels - 1) / 2 - offset) ** 2


def _centred_ms(levels: int) -> float:
    """Mean square about ``levels / 2`` of codes uniform over 0 .. levels - 1 with 0 moved to ``levels / 2``."""
    half = levels // 2
    return (half - 1) * (2 * half - 1) / 6


def _ints_ms(lo: int, hi: int) -> float:
    """Mean square of an integer uniform over lo .. hi."""
    return sum(k * k for k in range(lo, hi + 1)) / (hi - lo + 1)


@dataclass(frozen=True)
class Recipe:
    """How one block type's scale fields are drawn: offsets of fp16 d and of the min field (None: the
    type has none), the code centre the min cancels, the decoded codes' mean square (sub-scales included)."""

    d_at: int
    min_at: int | None
    center: float
    code_ms: float


K_SCALES = (8, 31)  # Q4_K / Q5_K 6-bit sub-block scales (and mins)
Q6_SCALES = (4, 15)  # Q6_K int8 sub-block scale magnitudes
RECIPES = {
    QT.Q8_0: Recipe(0, None, 0.0, _centred_ms(256)),  # int8 codes, -127 .. 127 (_centre_codes)
    QT.Q4_0: Recipe(0, None, 0.0, _centred_ms(16)),
    QT.Q5_0: Recipe(0, None, 0.0, _centred_ms(32)),
    QT.Q4_1: Recipe(0, 2, 7.5, _uniform_ms(16, 7.5)),
    QT.Q5_1: Recipe(0, 2, 15.5, _uniform_ms(32, 15.5)),
    QT.Q4_K: Recipe(0, 2, 7.5, _uniform_ms(16, 7.5) * _ints_ms(*K_SCALES)),
    QT.Q5_K: Recipe(0, 2, 15.5, _uniform_ms(32, 15.5) * _ints_ms(*K_SCALES)),
    QT.Q6_K: Recipe(208, None, 0.0, _uniform_ms(64, 32) * _ints_ms(*Q6_SCALES)),
}


def base_scale(qtype: QT, std: float) -> float:
    """``d0`` of ``qtype`` for decoded values of root-mean-square ``std``; ValueError when fp16 cannot
    hold every ``d`` drawn (to within 1 %)."""
    d0 = std / sqrt(_U_MS * RECIPES[qtype].code_ms)
    if not (_D_MIN <= d0 * _U_LO and d0 * _U_HI < 65504):
        raise ValueError(f"std {std} gives {qtype.name} scales that fp16 cannot hold; use a std in 1e-3 .. 10")
    return d0


def _random_bytes(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` uniform random bytes (full-range int64 words, about 6x faster than uint8 randint on a CPU)."""
    words = torch.empty(-(-n // 8), dtype=torch.int64, device=device).random_(-(2 ** 63), None, generator=gen)
    return words.view(torch.uint8)[:n]


def _scales(b: torch.Tensor, qtype: QT, d: torch.Tensor, gen: torch.Generator) -> None:
    """Overwrite the scale fields of blocks ``b`` [n, size] with ``d`` [n] and drawn sub-scales / mins."""
    r, n = RECIPES[qtype], b.shape[0]
    d16 = d.to(torch.float16)
    b[:, r.d_at:r.d_at + 2] = f16_bytes(d16)
    if qtype in (QT.Q4_1, QT.Q5_1):
        b[:, r.min_at:r.min_at + 2] = f16_bytes(-r.center * d16.float())
    elif qtype in (QT.Q4_K, QT.Q5_K):
        b[:, r.min_at:r.min_at + 2] = f16_bytes(r.center * d16.float())
        sc = torch.randint(K_SCALES[0], K_SCALES[1] + 1, (n, 8), generator=gen, device=b.device, dtype=torch.uint8)
        b[:, 4:16] = pack_k_scales(sc, sc)
    elif qtype == QT.Q6_K:
        mag = torch.randint(Q6_SCALES[0], Q6_SCALES[1] + 1, (n, 16), generator=gen, device=b.device)
        sign = torch.randint(0, 2, (n, 16), generator=gen, device=b.device) * 2 - 1
        b[:, 192:208] = (mag * sign).to(torch.int8).view(torch.uint8)


def _centre_codes(b: torch.Tensor, qtype: QT) -> None:
    """Q8_0 / Q4_0 / Q5_0 blocks ``b`` [n, size]: each code of 0 (Q8_0: -128) set to the zero point in place."""
    if qtype == QT.Q8_0:
        q = b[:, 2:34]
        q[q == 0x80] = 0
    elif qtype == QT.Q4_0:
        q = b[:, 2:18]
        q |= (((q & 0x0F) == 0).to(torch.uint8) << 3) | (((q >> 4) == 0).to(torch.uint8) << 7)
    elif qtype == QT.Q5_0:  # a code is 0 when its nibble and its fifth bit (qh, bytes 2..5) are
        qh, qs = b[:, 2:6], b[:, 6:22]
        zero = torch.cat([(qs & 0x0F) == 0, (qs >> 4) == 0], dim=-1) & (fifth_bits(qh) == 0)  # [n, 32]
        bits = zero.view(-1, 4, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32, device=b.device)
        qh |= bits.sum(-1).to(torch.uint8)


def random_blocks(qtype: QT, n_blocks: int, std: float, gen: torch.Generator) -> torch.Tensor:
    """``n_blocks`` random blocks of ``qtype`` as uint8 [n_blocks, type_size] on ``gen``'s device, decoding
    to values of root-mean-square ``std``."""
    d0 = base_scale(qtype, std)
    size = block_geometry(qtype)[1]
    b = _random_bytes(n_blocks * size, gen, gen.device).view(n_blocks, size)
    u = torch.rand(n_blocks, generator=gen, device=gen.device) * (_U_HI - _U_LO) + _U_LO
    _scales(b, qtype, d0 * u, gen)
    _centre_codes(b, qtype)
    return b


def random_floats(qtype: QT, n: int, std: float, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    """``n`` values N(mean, std) stored as ``qtype`` (F32 / F16 / BF16), as uint8 bytes."""
    x = torch.empty(n, dtype=torch.float32, device=gen.device).normal_(mean, std, generator=gen)
    return x.to(PLAIN[qtype]).view(torch.uint8)


def tensor_chunks(qtype: QT, shape: tuple[int, ...], std: float, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The bytes of a random tensor of ``shape`` stored as ``qtype``, in chunks of about
    :data:`CHUNK_BYTES` (uint8, on ``gen``'s device; whole blocks, whole rows not required)."""
    if qtype not in RECIPES and qtype not in PLAIN:
        raise ValueError(f"no random blocks for {qtype.name}: use one of "
                         f"{', '.join(t.name for t in (*PLAIN, *RECIPES))}")
    block, size = block_geometry(qtype)
    n = prod(shape)
    assert n % block == 0, (qtype, shape)
    per_chunk = max(1, CHUNK_BYTES // size)
    for start in range(0, n // block, per_chunk):
        count = min(per_chunk, n // block - start)
        if qtype in PLAIN:
            yield random_floats(qtype, count * block, std, gen)
        else:
            yield random_blocks(qtype, count, std, gen).view(-1)
