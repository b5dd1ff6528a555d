# Token embedding lookup (row gather).
#
# Shapes:  ids [...] int32/int64 (any shape, any strides: flattened with .reshape(-1)),
#          table [V, H]  ->  out [..., H] (new contiguous tensor, table's dtype).
# Strides: table's last dim must be contiguous; its row stride may be anything.
# Dtypes:  table in {bf16, fp16, fp32}; ids int32 or int64.
# Validity: ids are ASSUMED valid (0 <= id < V): the engine validates on the host, a device-side
#          check would need a sync.  Loads are masked, so an invalid id yields a zero row instead
#          of an out-of-bounds read.
# Grid:    (num_tokens, cdiv(H, BLOCK_H)).
from __future__ import annotations


import torch
import triton
import triton.language as tl

from kernels.checks import check_device
from kernels.fastlaunch import fast

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _embedding_kernel(ids_ptr, table_ptr, out_ptr, V, H, stride_row, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    idx = tl.load(ids_ptr + tok).to(tl.int64)
    valid = (idx >= 0) & (idx < V)
    mask = cols < H
    # fold the scalar `valid` into the limit (scalar & block masks trip the Triton interpreter)
    load_mask = cols < tl.where(valid, H, 0)
    row = tl.load(table_ptr + idx * stride_row + cols, mask=load_mask, other=0.0)
    tl.store(out_ptr + tok * H + cols, row, mask=mask)


def embedding(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gather ``table[ids]`` -> [..., H] in the table's dtype.

    ``ids`` are assumed to be in [0, V) (not checked on the device; invalid ids give zero rows).
    """
    if ids.dtype not in _INT_DTYPES:
        raise ValueError(f"embedding: ids must be int32 or int64, got {ids.dtype}")
    if table.dim() != 2:
        raise ValueError(f"embedding: table must be 2-D [V, H], got shape {tuple(table.shape)}")
    if table.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"embedding: unsupported table dtype {table.dtype}")
    if table.stride(1) != 1:
        raise ValueError(f"embedding: table's last dim must be contiguous, got strides {table.stride()}")
    check_device(ids, table)
    vocab, hidden = table.shape
    out = torch.empty((*ids.shape, hidden), dtype=table.dtype, device=table.device)
    flat = ids.reshape(-1)
    if flat.numel() == 0 or hidden == 0:
        return out
    flat = flat.contiguous()
    block = min(triton.next_power_of_2(hidden), 2048)
    grid = (flat.numel(), triton.cdiv(hidden, block))
    _embedding_launch[grid](
        flat, table, out, vocab, hidden, table.stride(0), BLOCK_H=block, num_warps=4 if block <= 1024 else 8
    )
    return out


def embedding_ref(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """fp32 reference: ``table[ids]`` as a float32 tensor."""
    return table.float()[ids.long()]


_embedding_launch = fast(_embedding_kernel)  # launched through kernels.fastlaunch
