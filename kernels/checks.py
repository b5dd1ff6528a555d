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
