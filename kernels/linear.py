# nn.Linear dispatcher: out = x @ w.T + bias over arbitrary leading dims.
#
# Shapes:  x    [..., K]  last dim unit stride; leading dims are flattened to M
#                         (a copy is made only if they cannot be viewed as one)
#          w    [N, K]    row-major, unit stride along K ([out_features, in_features])
#          bias [N]       contiguous, optional
#          out  [..., N]  new contiguous tensor, dtype of x (or the caller's [M, N], any row stride)
# Dispatch: M <= 64 -> kernels.gemv (weight streaming, decode)
#           M  > 64 -> kernels.gemm (tiled tensor-core GEMM, prefill)
from __future__ import annotations

import torch

from kernels.gemm import check_acc, check_linear_inputs, check_out, gemm
from kernels.gemv import gemv

GEMV_MAX_M = 64


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``x @ w.T + bias`` with Triton kernels; returns [..., N] in x's dtype.

    x: [..., K], w: [N, K] (Hugging Face layout), bias: [N] or None; x, w and
    bias must share one dtype (bf16/fp16/fp32).  Rows M = prod(leading dims)
    go to the GEMV kernel when M <= 64, else to the tiled GEMM. ``out`` (x 2-D only): [M, N] with unit
    stride along N and any row stride (a column slice of a wider output), written and returned; it may be fp32
    (a running sum). ``acc`` (x 2-D only): [M, N] added to the product (a running sum of K chunks; it
    may be ``out`` itself).
    """
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"K mismatch: x{tuple(x.shape)} vs w{tuple(w.shape)} ([N, K] layout)")
    if x.stride(-1) != 1 and x.numel() > 0:
        raise ValueError("x must have unit stride along its last dim")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    check_linear_inputs(x2, w, bias)
    if acc is not None:
        if x.dim() != 2:
            raise ValueError(f"acc needs a 2-D x [M, K], got x{tuple(x.shape)}")
        out = out if out is not None else torch.empty((x2.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
        check_out(x2, w, out, fp32_ok=True)
        check_acc(out, acc)
        if x2.shape[0] <= GEMV_MAX_M:  # a few rows: the GEMV's product, then the sum (torch)
            return out.copy_(gemv(x2, w, bias).float() + acc.float())
        return gemm(x2, w, bias, out=out, acc=acc)
    if out is not None:
        if x.dim() != 2:
            raise ValueError(f"out needs a 2-D x [M, K], got x{tuple(x.shape)}")
        check_out(x2, w, out, fp32_ok=True)
        return out.copy_(gemv(x2, w, bias)) if x2.shape[0] <= GEMV_MAX_M else gemm(x2, w, bias, out=out)
    fn = gemv if x2.shape[0] <= GEMV_MAX_M else gemm
    return fn(x2, w, bias).view(*lead, w.shape[0])


def linear_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference for :func:`linear` (returns float32, shape [..., N])."""
    out = x.float() @ w.float().T
    if bias is not None:
        out = out + bias.float()
    return out
