"""AutoAWQ ``version: gemm`` checkpoints -> the canonical layout (engine/quant/spec.py).

Published layout of a quantized linear ``[N, K]`` (``N = out_features``, ``K = in_features``):

``qweight`` int32 ``[K, N / 8]``: 8 codes per word along the OUTPUT dim, word ``j`` holding output
            columns ``8j .. 8j+7`` in the nibble order 0, 2, 4, 6, 1, 3, 5, 7 (nibble ``i``, bits
            ``4i .. 4i+3``, holds column ``8j + ORDER[i]``).
``qzeros``  int32 ``[K / G, N / 8]``: the zero points, packed the same way.
``scales``  fp16 ``[K / G, N]``.

``w[k, n] = (code - zero) * scale``. ``zero_point: false`` checkpoints have no ``qzeros`` and use the
implicit zero 8 (as compressed-tensors' AutoAWQ converter reads them). Conversion unpacks the codes,
transposes them to ``[N, K]`` and repacks along K; nothing is dequantized.
"""

from __future__ import annotations

import torch

from engine.quant.spec import QuantSpec, QuantWeight, unpack_codes
from engine.quant.tensors import Getter, fetch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of its 8
_UNDO = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])  # column c sits in nibble _UNDO[c]


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C / 8]`` packed in AWQ order -> uint8 codes ``[R, C]`` in column order."""
    slots = unpack_codes(words, 4).reshape(words.shape[0], -1, 8)
    return torch.index_select(slots, 2, _UNDO).reshape(words.shape[0], -1)


def awq_to_canonical(words: torch.Tensor) -> torch.Tensor:
    """AWQ ``qweight`` int32 ``[K, N / 8]`` -> canonical int32 ``[N, K / 8]``: the codes of inputs 2j and
    2j+1 become the low and high nibble of byte j of each output row (then read as int32 words)."""
    codes = unpack_awq(words)
    pairs = codes[0::2] | (codes[1::2] << 4)  # [K / 2, N] bytes
    return pairs.T.contiguous().view(torch.int32)


def load_awq(prefix: str, get: Getter, n: int, k: int, spec: QuantSpec) -> QuantWeight:
    """The canonical weight of the AWQ module ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``)."""
    g = spec.group(k)
    if n % 8:
        raise ValueError(f"{prefix}: out_features {n} is not a multiple of 8 (AWQ packs 8 outputs per int32)")
    if k % g:
        raise ValueError(f"{prefix}: group_size {g} does not divide in_features {k}")
    qweight = fetch(get, f"{prefix}.qweight", (k, n // 8), (torch.int32,), " (AWQ: [in, out/8])")
    scales = fetch(get, f"{prefix}.scales", (k // g, n), (torch.float16, torch.bfloat16), " (AWQ: [in/group, out])")
    zeros = None
    if not spec.sym:
        qzeros = fetch(get, f"{prefix}.qzeros", (k // g, n // 8), (torch.int32,), " (AWQ: [in/group, out/8])")
        zeros = unpack_awq(qzeros).T.to(scales.dtype).contiguous()
    qw = QuantWeight(awq_to_canonical(qweight), scales.T.contiguous(), zeros, None, spec, k)
    qw.check(prefix)
    return qw
