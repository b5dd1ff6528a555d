"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor; int4 / int8 weight-only) -> canonical.

Published layout of a quantized linear ``[N, K]`` with ``P = 32 / bits``:

``weight_packed``      int32 ``[N, K / P]``: signed codes plus ``2**(bits-1)``, packed densely along the
                       input dim, element i at bit ``i * bits`` (exactly the canonical ``qweight``).
``weight_scale``       ``[N, K / G]`` (G = K for the ``channel`` strategy: ``[N, 1]``), the model dtype.
``weight_zero_point``  asymmetric only: int32 ``[ceil(N / P), K / G]``, signed zero points plus
                       ``2**(bits-1)`` packed along the OUTPUT dim (older writers: int8 ``[N, K / G]``
                       unpacked, signed).
``weight_shape``       int ``[2]``: ``(N, K)``.
``weight_g_idx``       optional int32 ``[K]`` (``actorder``): the group of each input channel.

``w = (q - zp) * scale`` on the signed values, i.e. ``(code - zero)`` on the unsigned ones.
"""

from __future__ import annotations

import torch

from engine.quant.spec import QuantSpec, QuantWeight, pack_codes, unpack_codes
from engine.quant.tensors import Getter, fetch, perm_from_g_idx


def _zeros(prefix: str, get: Getter, n: int, groups: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Unsigned zero points [N, K/G] in the scales' dtype, from either stored form."""
    name = f"{prefix}.weight_zero_point"
    zp = get(name)
    off = 1 << (bits - 1)
    if zp is not None and zp.dtype == torch.int8 and tuple(zp.shape) == (n, groups):
        return (zp.to(torch.int32) + off).to(dtype)
    rows = -(-n * bits // 32)
    zp = fetch(get, name, (rows, groups), (torch.int32,), f" (packed along the output dim; or int8 [{n}, {groups}])")
    return unpack_codes(zp.T.contiguous(), bits)[:, :n].T.to(dtype).contiguous()


def load_ct(prefix: str, get: Getter, n: int, k: int, spec: QuantSpec) -> QuantWeight:
    """The canonical weight of the compressed-tensors module ``prefix``."""
    per, g = spec.pack, spec.group(k)
    if k % per:
        raise ValueError(f"{prefix}: in_features {k} is not a multiple of {per} ({spec.bits}-bit packing)")
    if k % g:
        raise ValueError(f"{prefix}: group_size {g} does not divide in_features {k}")
    shape = fetch(get, f"{prefix}.weight_shape", (2,), (torch.int64, torch.int32), " (out, in)")
    if tuple(shape.tolist()) != (n, k):
        raise ValueError(f"{prefix}.weight_shape: expected [{n}, {k}] from config.json, got {shape.tolist()}")
    packed = fetch(get, f"{prefix}.weight_packed", (n, k // per), (torch.int32,), f" ([out, in/{per}])")
    scales = fetch(get, f"{prefix}.weight_scale", (n, k // g), (torch.float16, torch.bfloat16),
                   " ([out, in/group])")
    zeros = None if spec.sym else _zeros(prefix, get, n, k // g, spec.bits, scales.dtype)
    perm = None
    if get(f"{prefix}.weight_g_idx") is not None:
        g_idx = fetch(get, f"{prefix}.weight_g_idx", (k,), (torch.int32, torch.int64), " (group of each input)")
        perm = perm_from_g_idx(f"{prefix}.weight_g_idx", g_idx, g)
    if perm is not None:
        packed = pack_codes(unpack_codes(packed, spec.bits)[:, perm.long()], spec.bits)
    qw = QuantWeight(packed.contiguous(), scales.contiguous(), zeros, perm, spec, k)
    qw.check(prefix)
    return qw
