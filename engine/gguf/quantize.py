"""Float rows -> GGUF blocks, for writing synthetic GGUF files (tests, benchmarks).

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 use the ``gguf`` package's quantizers (llama.cpp's reference
rounding). The package has none for the K-quants, so Q4_K, Q5_K and Q6_K are encoded here with a
plain min/max fit per sub-block (llama.cpp searches for better scales; any valid encoding is
fine for synthetic weights, and :mod:`engine.gguf.dequant` decodes whatever the bits say).
Bit layouts are the inverse of the decoders in :mod:`engine.gguf.dequant`; the fp16 and K-scale
packers are shared with :mod:`engine.gguf.random_blocks`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as np_quantize

K_TYPES = (QT.Q4_K, QT.Q5_K, QT.Q6_K)


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float -> [n, 2] bytes of fp16."""
    return x.to(torch.float16).view(torch.uint8).view(-1, 2)


def pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per block -> the 12-byte packing that ``kernels.ggml_blocks.k_scales`` reads."""
    s = sc.new_zeros((sc.shape[0], 12))
    s[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    s[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return s


def _k_affine_fit(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, ...]:
    """x [n, 8, 32] -> (d, dmin, 6-bit scales, 6-bit mins, ints in 0..levels) of y = d*sc*q - dmin*m."""
    lo = x.amin(-1).clamp(max=0.0)
    scale = (x.amax(-1) - lo) / levels
    d = scale.amax(-1) / 63
    dmin = (-lo).amax(-1) / 63
    sc = torch.where(d[:, None] > 0, (scale / d[:, None].clamp(min=1e-30)).round(), 0.0).clamp(0, 63)
    mn = torch.where(dmin[:, None] > 0, (-lo / dmin[:, None].clamp(min=1e-30)).round(), 0.0).clamp(0, 63)
    d, dmin = d.to(torch.float16).float(), dmin.to(torch.float16).float()  # what the decoder will see
    step = (d[:, None] * sc).unsqueeze(-1)
    q = ((x + (dmin[:, None] * mn).unsqueeze(-1)) / step.clamp(min=1e-30)).round().clamp(0, levels)
    q = torch.where(step > 0, q, 0.0)
    return d, dmin, sc.to(torch.uint8), mn.to(torch.uint8), q.to(torch.uint8)


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mn, q = _k_affine_fit(x.view(-1, 8, 32), 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_k_scales(sc, mn), qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mn, q = _k_affine_fit(x.view(-1, 8, 32), 31)
    low, high = q & 0xF, q >> 4
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = (high << torch.arange(8, dtype=torch.uint8).view(1, 8, 1)).sum(1, dtype=torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), pack_k_scales(sc, mn), qh, qs], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    x = x.view(-1, 16, 16)
    sub = x.abs().amax(-1) / 32
    d = sub.amax(-1) / 127
    sc = torch.where(d[:, None] > 0, (sub / d[:, None].clamp(min=1e-30)).round(), 0.0).clamp(-128, 127)
    d = d.to(torch.float16).float()
    step = (d[:, None] * sc).unsqueeze(-1)
    q = torch.where(step > 0, (x / step.clamp(min=1e-30)).round().clamp(-32, 31), 0.0)
    q = (q + 32).to(torch.uint8).view(-1, 2, 4, 32)  # per half: runs g0..g3 of 32
    low = q & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=-1).reshape(-1, 128)
    high = (q >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qh = high.sum(2, dtype=torch.uint8).reshape(-1, 64)
    return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), f16_bytes(d)], dim=1)


def quantize(x: torch.Tensor, qtype: QT) -> np.ndarray:
    """Rows of ``x`` (float, last dim a multiple of the block size) -> uint8 blocks [rows, row_bytes]."""
    x2 = x.detach().float().reshape(-1, x.shape[-1])
    if qtype == QT.F32:
        return x2.numpy().astype(np.float32)
    if qtype == QT.F16:
        return x2.numpy().astype(np.float16)
    if qtype == QT.BF16:
        return x2.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(x2.shape[0], -1)
    if qtype in K_TYPES:
        fn = {QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k}[qtype]
        return fn(x2.reshape(-1, 256)).reshape(x2.shape[0], -1).numpy()
    return np_quantize(x2.numpy(), qtype)
