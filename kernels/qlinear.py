# Quantized nn.Linear dispatcher: out = x @ dequant(w).T + bias over arbitrary leading dims.
#
# Shapes:  x [..., K] (last dim unit stride; leading dims flattened to M), the packed weight as in
#          kernels/quant_common.py (qweight int32 [N, K*BITS/32], scales / zeros [N, K/G], perm [K]
#          or None, mins like scales or None), bias [N] or None; out [..., N] in x's dtype.
# Dispatch: M <= 64 -> kernels.qgemv (decode), M > 64 -> kernels.qgemm (prefill).
from __future__ import annotations

import torch

from kernels.qgemm import qgemm
from kernels.qgemv import qgemv

QGEMV_MAX_M = 64


def qlinear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bits: int, bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
            mins: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a packed linear weight with Triton kernels; returns [..., N] in x's dtype."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fn = qgemv if x2.shape[0] <= QGEMV_MAX_M else qgemm
    return fn(x2, qweight, scales, zeros, bits, bias, perm, mins=mins).view(*lead, qweight.shape[0])
