"""Matmuls through cuBLAS that leave no workspace behind.

The engine's passes never call cuBLAS (every projection is a Triton kernel); only a tuner's fp32 reference
check and the planner's context measurement do. torch keeps a 32 MiB cuBLAS workspace (Hopper) per (handle,
stream) that ever ran a matmul, inside the caching allocator and for the process's life: at 6 GiB on the H200 a
served pass ran out of memory with two such workspaces alive (the planner's on the default stream, a qgemv
tuner's on the compute stream) where the plan's allowance had room for one (session 30, bench/oomsite)."""

from __future__ import annotations

import threading

import torch

_LOCK = threading.Lock()  # one matmul and its release at a time: the release empties torch's whole workspace map


def release_workspaces() -> None:
    """Free every cuBLAS workspace torch holds (they return to the caching allocator; the next matmul makes
    its own again). A no-op without CUDA."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        clear()


def matmul_released(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, then the workspace it made released (CUDA tensors); on the CPU a plain matmul."""
    if not a.is_cuda:
        return a @ b
    with _LOCK:
        out = a @ b
        release_workspaces()
    return out
