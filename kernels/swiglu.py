# SwiGLU activation over a fused [gate; up] projection output.
#
# Shapes:  gate_up [..., 2*I]  ->  out [..., I] (new contiguous tensor).
#          gate = gate_up[..., :I], up = gate_up[..., I:].
# Strides: gate_up must be contiguous (rows of 2*I elements).
# Dtypes:  bf16 / fp16 / fp32; out has the input dtype.
# Math:    fp32: a = silu(gate) rounded to the input dtype (HF applies act_fn in that dtype),
#          out = round(a * up).
# Grid:    (rows, cdiv(I, BLOCK)).
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.checks import check_device
from kernels.fastlaunch import fast

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    in_row = gu_ptr + row * (2 * I)
    g = tl.load(in_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(in_row + I + cols, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    a = (g * tl.sigmoid(g)).to(ty).to(tl.float32)
    tl.store(out_ptr + row * I + cols, (a * u).to(ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Return ``silu(gate) * up`` for ``gate_up = [gate; up]`` along the last dim.

    ``gate_up``: contiguous [..., 2*I] bf16/fp16/fp32.  Returns [..., I] in the same dtype.
    """
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2 != 0 or gate_up.shape[-1] == 0:
        raise ValueError(f"swiglu: last dim must be a positive even size, got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"swiglu: unsupported dtype {gate_up.dtype}")
    if not gate_up.is_contiguous():
        raise ValueError(f"swiglu: gate_up must be contiguous, got strides {gate_up.stride()}")
    check_device(gate_up)
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype, device=gate_up.device)
    rows = gate_up.numel() // (2 * inter)
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(inter), 2048)
    grid = (rows, triton.cdiv(inter, block))
    _swiglu_launch[grid](gate_up, out, inter, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return out


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """fp32 reference: ``silu(gate) * up`` as a float32 tensor."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


_swiglu_launch = fast(_swiglu_kernel)  # launched through kernels.fastlaunch
