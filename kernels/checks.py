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


def check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        seq_lens: torch.Tensor) -> None:
    """Decode attention's inputs: q [B, Hq, D], caches [B, Hk, S, D] (Hk divides Hq), int32 seq_lens [B]."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}; expected bf16, fp16 or fp32")
    B, Hq, D = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_kv_cache(name, c, q, B, D)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.shape[1] == 0 or Hq % k_cache.shape[1] != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hk={k_cache.shape[1]}")
    if q.stride(2) != 1:
        raise ValueError("q must have unit stride along D (last dim)")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D={D} unsupported (1..256)")
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be a 1-D int32 tensor of length B={B}, "
                         f"got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if seq_lens.device != q.device:
        raise ValueError(f"device mismatch: seq_lens on {seq_lens.device}, q on {q.device}")
