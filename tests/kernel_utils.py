"""Shared setup for the Triton kernel tests: device, dtypes, tolerances, random inputs.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1 must
be set before triton is imported; tests/conftest.py or the environment does it, and the guard
below covers standalone runs). CPU shapes are kept small; real model shapes are CUDA-only.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
BT = [(1, 1), (3, 5)]
GQA_HEADS = [(4, 4), (4, 2), (7, 1)]  # (Hq, Hk) of the small head-layout tests: GQA ratios 1, 2, 7
cuda_only = pytest.mark.cuda  # real-size shapes need a CUDA GPU (skipped without one: tests/conftest.py)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def qkv_views(b: int, t: int, hq: int, hk: int, d: int, dtype: torch.dtype):
    """q, k, v as non-contiguous head views of a fused [B, T, (Hq+2Hk)*D] projection output."""
    qkv = rand(b, t, (hq + 2 * hk) * d, dtype=dtype, seed=1)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d)
    v = qkv[..., (hq + hk) * d :].view(b, t, hk, d)
    return q, k, v


# ----- matmul / attention tests: relative L2 error against an fp32 reference
MATMUL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
needs_cuda = pytest.mark.cuda  # skipped without CUDA by tests/conftest.py


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (NaN-checked)."""
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Normal samples on the test device in ``dtype`` (drawn in fp32, scaled)."""
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype)
