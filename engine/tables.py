"""Checkpoint tensors read for the compute dtype without a whole-tensor float32 copy on the host.

A GGUF block tensor is widened by ``engine.gguf.checkpoint.GGUFCheckpoint.tensor``, by default to float32.
Read that way and then cast, the token embedding of a 70B (128256 x 8192 rows of Q4_K/Q6_K blocks) became a
4 GiB float32 host copy, and a cast on the host for the device copy added 2 GiB more, none of it counted by the
RAM preflight (``engine.preflight``). Here block tensors are widened straight into the compute dtype (the same
values: ``engine.gguf.dequant`` computes in float32 and rounds once as it writes), and a table bound for a GPU
crosses :data:`TABLE_CHUNK` bytes of rows at a time, so the host holds no whole copy beside it. What is still
held in host memory (a widened embedding kept on the host) is counted by ``engine.host_ram``.
"""

from __future__ import annotations

import torch

TABLE_CHUNK = 64 << 20  # float32 bytes of a table's rows widened or cast at a time on their way to a GPU


def widens(ckpt, name: str) -> bool:
    """Whether reading tensor ``name`` of ``ckpt`` makes a new tensor of it (GGUF blocks), not a view of the map."""
    check = getattr(ckpt, "widens", None)
    return check is not None and check(name)


def read(ckpt, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor ``name`` as the file holds it (a view of the map, in the file's dtype; the caller casts), or a GGUF
    block tensor widened straight into ``dtype`` (also what an embedding kept in host memory is)."""
    return ckpt.tensor(name, dtype) if widens(ckpt, name) else ckpt.tensor(name)


def device_table(ckpt, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Table ``name`` (the embedding, a widened lm_head) in ``dtype`` on ``device``. On the CPU: :func:`read`, cast
    once where the file holds another dtype (that copy is the table the plan counts); on a GPU the rows are widened
    or cast :data:`TABLE_CHUNK` bytes at a time into the device tensor."""
    if device.type == "cpu":
        return read(ckpt, name, dtype).to(dtype)
    rows_of = getattr(ckpt, "tensor_rows", None)
    shape = ckpt.tensors[name].shape
    out = torch.empty(shape, dtype=dtype, device=device)
    step = max(1, TABLE_CHUNK // max(1, out[0].numel() * 4))
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        out[r0:r1].copy_(rows_of(name, r0, r1, dtype) if rows_of is not None else ckpt.tensor(name)[r0:r1])
    return out
