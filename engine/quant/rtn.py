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
BLOCK_ROWS = 512  # rows quantized per block (two fp32 temporaries of BLOCK_ROWS x K: 60 MB each at K = 29568)


def default_sym(bits: int) -> bool:
    """int8 is symmetric by default, int4 asymmetric."""
    return bits == 8


def _quantize_rows(w: torch.Tensor, spec: QuantSpec, g: int, sdtype: torch.dtype):
    """Codes (fp32, integral), scales and zeros of a block of rows ``w`` [R, K] (fp32), with one [R, K]
    temporary beside ``w``: the codes, computed in place."""
    rows, k = w.shape
    grouped = w.reshape(rows, k // g, g)
    top = (1 << spec.bits) - 1
    if spec.sym:
        half = 1 << (spec.bits - 1)
        scale = (grouped.abs().amax(dim=-1) / (half - 1)).to(sdtype)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.div(grouped, scale.float().unsqueeze(-1)).round_().clamp_(-half, half - 1).add_(half)
        return q, scale, None
    lo = grouped.amin(dim=-1).clamp(max=0)
    hi = grouped.amax(dim=-1).clamp(min=0)
    scale = ((hi - lo) / top).to(sdtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-lo / scale.float()).clamp(0, top)
    q = torch.div(grouped, scale.float().unsqueeze(-1)).round_().add_(zero.unsqueeze(-1)).clamp_(0, top)
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
    # outputs filled block by block: pieces collected and concatenated held the result twice, and their
    # interleaving with the blocks' temporaries kept glibc's heap from reusing them (a 7B layer's int8 rounding
    # peaked at 0.3 to 1.0 GiB of RSS from one run to the next, 0.3 GiB live)
    words = torch.empty((n, k // spec.pack), dtype=torch.int32)
    scales = torch.empty((n, k // g), dtype=sdtype)
    zeros = None if spec.sym else torch.empty((n, k // g), dtype=sdtype)
    for r in range(0, n, BLOCK_ROWS):
        q, s, z = _quantize_rows(w[r:r + BLOCK_ROWS].float(), spec, g, sdtype)
        words[r:r + BLOCK_ROWS] = pack_codes(q.view(q.shape[0], k), bits)  # integral codes 0 .. 2**bits - 1
        scales[r:r + BLOCK_ROWS] = s
        if zeros is not None:
            zeros[r:r + BLOCK_ROWS] = z
    qw = QuantWeight(words, scales, zeros, None, spec, k)
    qw.check(name)
    return qw
