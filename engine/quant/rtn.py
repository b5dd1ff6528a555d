"""Round-to-nearest quantization of a full-precision linear weight (``--quantize int8|int4``).

Per group of G input columns of each output row: asymmetric (the default for int4) maps
``[min(w, 0), max(w, 0)]`` onto the codes ``0 .. 2**bits - 1`` with an integer zero point;
symmetric (the default for int8) maps ``[-max|w|, max|w|]`` onto ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1``
around the implicit zero ``2**(bits-1)``. The scales are rounded to their storage dtype before the
codes are computed, so :func:`engine.quant.spec.dequantize` reproduces exactly what was rounded.
Runs on the host, a block of rows at a time, so the fp32 temporaries stay small.
"""

from __future__ import annotations

import torch

from engine.quant.spec import HALF_SCALES, QuantSpec, QuantWeight, pack_codes

DEFAULT_GROUP = 128
_ROWS = 512  # rows quantized per block (a few fp32 temporaries of _ROWS x K: 60 MB each at K = 29568)


def default_sym(bits: int) -> bool:
    """int8 is symmetric by default, int4 asymmetric."""
    return bits == 8


def _quantize_rows(w: torch.Tensor, spec: QuantSpec, g: int, sdtype: torch.dtype):
    """Codes, scales and zeros of a block of rows ``w`` [R, K] (fp32)."""
    rows, k = w.shape
    grouped = w.reshape(rows, k // g, g)
    top = (1 << spec.bits) - 1
    if spec.sym:
        half = 1 << (spec.bits - 1)
        scale = (grouped.abs().amax(dim=-1) / (half - 1)).to(sdtype)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(grouped / scale.float().unsqueeze(-1)).clamp(-half, half - 1) + half
        return q, scale, None
    lo = grouped.amin(dim=-1).clamp(max=0)
    hi = grouped.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / top).to(sdtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale.float()).clamp(0, top)
    q = (torch.round(grouped / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, top)
    return q, scale, zero.to(sdtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP, sym: bool | None = None,
                 name: str = "weight") -> QuantWeight:
    """Quantize a 2-D ``[N, K]`` bf16/fp16/fp32 weight to the canonical layout (host tensors).

    ``group_size`` -1 means one scale per output row. Scales (and zeros) keep ``w``'s dtype when it
    is fp16/bf16, else fp16. Raises ValueError (naming ``name``) for a bit width other than 4/8, a
    group that does not divide K, or K not a multiple of ``32 / bits``.
    """
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {list(w.shape)}")
    spec = QuantSpec(bits, group_size, default_sym(bits) if sym is None else sym, "rtn")
    n, k = w.shape
    g = spec.group(k)
    if k % g or k % spec.pack:
        raise ValueError(f"{name}: group size {g} and {bits}-bit packing ({spec.pack} per int32) "
                         f"must divide in_features {k}; choose another --quant-group")
    sdtype = w.dtype if w.dtype in HALF_SCALES else torch.float16
    words, scales, zeros = [], [], []
    for r in range(0, n, _ROWS):
        q, s, z = _quantize_rows(w[r:r + _ROWS].float(), spec, g, sdtype)
        words.append(pack_codes(q.reshape(q.shape[0], k).to(torch.int32), bits))
        scales.append(s)
        zeros.append(z)
    qw = QuantWeight(torch.cat(words), torch.cat(scales).contiguous(),
                     None if spec.sym else torch.cat(zeros).contiguous(), None, spec, k)
    qw.check(name)
    return qw
