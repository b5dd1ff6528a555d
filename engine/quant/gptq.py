"""GPTQ checkpoints (AutoGPTQ / GPTQModel, ``checkpoint_format: gptq``, i.e. v1) -> the canonical layout.

Published layout of a quantized linear ``[N, K]`` with ``P = 32 / bits`` codes per int32:

``qweight`` int32 ``[K / P, N]``: packed along the INPUT dim, word ``[i, n]`` holding inputs
            ``iP .. iP+P-1`` of output n, input ``iP + j`` in bits ``j*bits ..`` (the canonical order,
            transposed).
``qzeros``  int32 ``[K / G, N / P]``: zero points packed along the output dim in the same bit order,
            stored MINUS ONE in v1 (``gptq_v2`` stores them as they are).
``scales``  fp16 ``[K / G, N]``.
``g_idx``   int32 ``[K]``: the group of each input channel; with ``desc_act: true`` (act order) the
            groups are not contiguous, and the loader sorts the channels once (a permutation the
            kernels apply to x).

``w[k, n] = (code - (stored_zero + 1)) * scale``. Symmetric checkpoints store the zero ``2**(bits-1)``
everywhere; they become canonical symmetric weights (no zeros) when every zero is exactly that.
"""

from __future__ import annotations

import torch

from engine.quant.spec import QuantSpec, QuantWeight, pack_codes, unpack_codes
from engine.quant.tensors import Getter, fetch, perm_from_g_idx


def load_gptq(prefix: str, get: Getter, n: int, k: int, spec: QuantSpec, v2: bool = False) -> QuantWeight:
    """The canonical weight of the GPTQ module ``prefix``."""
    per, g = spec.pack, spec.group(k)
    if k % per or n % per:
        raise ValueError(f"{prefix}: in_features {k} and out_features {n} must be multiples of {per} "
                         f"({spec.bits}-bit GPTQ packing)")
    if k % g:
        raise ValueError(f"{prefix}: group_size {g} does not divide in_features {k}")
    qweight = fetch(get, f"{prefix}.qweight", (k // per, n), (torch.int32,), f" (GPTQ: [in/{per}, out])")
    scales = fetch(get, f"{prefix}.scales", (k // g, n), (torch.float16, torch.bfloat16), " (GPTQ: [in/group, out])")
    qzeros = fetch(get, f"{prefix}.qzeros", (k // g, n // per), (torch.int32,), f" (GPTQ: [in/group, out/{per}])")
    zeros = unpack_codes(qzeros, spec.bits).to(torch.int32) + (0 if v2 else 1)  # v1 stores zero - 1 (0 -> 2**bits)
    perm = None
    if (g_idx := get(f"{prefix}.g_idx")) is not None:
        g_idx = fetch(get, f"{prefix}.g_idx", (k,), (torch.int32, torch.int64), " (GPTQ: group of each input)")
        perm = perm_from_g_idx(f"{prefix}.g_idx", g_idx, g)
    qweight = qweight.T.contiguous()
    if perm is not None:
        qweight = pack_codes(unpack_codes(qweight, spec.bits)[:, perm.long()], spec.bits)
    sym = bool((zeros == 1 << (spec.bits - 1)).all())
    qw = QuantWeight(qweight, scales.T.contiguous(), None if sym else zeros.T.to(scales.dtype).contiguous(),
                     perm, QuantSpec(spec.bits, spec.group_size, sym, spec.fmt), k)
    qw.check(prefix)
    return qw
