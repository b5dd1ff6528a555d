"""Input checks shared by the kernel launchers (plain Python, no Triton)."""

from __future__ import annotations

import os

import torch


def check_device(*tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device CUDA unless Triton's interpreter is on."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {dev}")
    if os.environ.get("TRITON_INTERPRET") != "1" and dev.type != "cuda":
        raise ValueError(f"tensors must be CUDA tensors (got {dev}); set TRITON_INTERPRET=1 for CPU")


def check_kv_cache(name: str, c: torch.Tensor, q: torch.Tensor, b: int, d: int) -> None:
    """A [B, Hk, S, D] cache matching q's batch, head dim, dtype and device, contiguous along D."""
    if c.dim() != 4 or c.shape[0] != b or c.shape[3] != d:
        raise ValueError(f"{name} must be [B={b}, Hk, S, D={d}], got {tuple(c.shape)}")
    if c.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: {name} is {c.dtype}, q is {q.dtype}")
    if c.device != q.device:
        raise ValueError(f"device mismatch: {name} on {c.device}, q on {q.device}")
    if c.stride(3) != 1:
        raise ValueError(f"{name} must have unit stride along D (last dim)")
