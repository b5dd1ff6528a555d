"""A pass's small host tensors (token ids, positions, lengths, block tables) onto the GPU through pinned memory.

A copy from pageable host memory is staged by the driver while the host waits, and the copy engine it
needs is busy with the streamed layers' weights, queued ahead of it: at a served step's start such copies
took ~0.4 ms of host time (session 23's decode trace), on the path the pass's first streamed layers wait
for. From pinned memory the copy is queued and the host goes on; PyTorch's pinned allocator keeps the block
until the copies reading it are done, so the host tensor may be dropped at once.
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; from the host to a GPU through a pinned copy, without the host waiting."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def upload_list(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A list of ints as a ``dtype`` tensor on ``device`` (see :func:`upload`)."""
    return upload(torch.tensor(values, dtype=dtype), device)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; from the host into a GPU tensor through a pinned copy, without the host waiting."""
    if dst.device.type == "cuda" and src.device.type == "cpu":
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)
