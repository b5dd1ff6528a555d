"""Split-K for the GEMV kernels (kernels/gemv.py, kernels/qgemv.py, kernels/qgemv_i8.py): each of SPLIT_K programs
of an N block writes its fp32 partial tile, and the last of them to draw a ticket (kernels.tickets) sums them in
the same kernel, or, without tickets (inside a CUDA-graph capture the counters cannot be allocated), a second
kernel does. The host side gives a launch its scratch (:func:`split_k_scratch`) and sums afterwards where needed
(:func:`reduce_split_k`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.tickets import counters, last_ticket


@triton.jit
def store_split_k(acc, b_ptr, out_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, rows_w, M, N, stride_om,
                  HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, TICKET: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """A GEMV program's epilogue: the out tile (+ bias), or with SPLIT_K > 1 its
    fp32 partial into the workspace, summed by the last program of the N block (TICKET) or by
    _gemv_splitk_reduce_kernel."""
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        _store_out(acc, b_ptr, out_ptr, offs_m, offs_n, rows_w, stride_om, out_mask, HAS_BIAS)
    else:
        ws_ptrs = ws_ptr + (tl.program_id(1) * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=out_mask)
        if TICKET:  # the last of the N block's SPLIT_K programs sums the partials (no 2nd kernel)
            if last_ticket(cnt_ptr + tl.program_id(0), tl.program_id(1), SPLIT_K):
                tl.store(cnt_ptr + tl.program_id(0), 0)
                _finish_split_k(ws_ptr, b_ptr, out_ptr, offs_m, offs_n, rows_w, M, N, stride_om,
                                out_mask, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _finish_split_k(ws_ptr, b_ptr, out_ptr, offs_m, offs_n, rows_w, M, N, stride_om, out_mask,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """out tile = sum of the SPLIT_K fp32 partial tiles (read at L2: .cg) + bias."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        ptrs = ws_ptr + (s * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        acc += tl.load(ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
    _store_out(acc, b_ptr, out_ptr, offs_m, offs_n, rows_w, stride_om, out_mask, HAS_BIAS)


@triton.jit
def _store_out(acc, b_ptr, out_ptr, offs_m, offs_n, rows_w, stride_om, out_mask, HAS_BIAS: tl.constexpr):
    """out tile = fp32 acc [BLOCK_M, BLOCK_N] + bias, cast to out's dtype."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_w).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemv_splitk_reduce_kernel(ws_ptr, b_ptr, out_ptr, M, N, stride_om,
                               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                               BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + idx, mask=mask, other=0.0)
    n = idx % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (idx // N).to(tl.int64) * stride_om + n,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_k_scratch(cfg: triton.Config, out: torch.Tensor, user: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A GEMV launch's split-K scratch for ``cfg`` (out [M, N]): the fp32 partials [SPLIT_K, M, N] (``out``
    itself without split-K) and, where the config sums them in the kernel (TICKET), the N blocks' ticket
    counters (kernels.tickets; ``user`` names the kernel family), else None: :func:`reduce_split_k` sums them."""
    sk = cfg.kwargs["SPLIT_K"]
    if sk == 1:
        return out, None
    ws = torch.empty((sk, *out.shape), device=out.device, dtype=torch.float32)
    ticket = cfg.kwargs.get("TICKET")
    return ws, counters(out.device, triton.cdiv(out.shape[1], cfg.kwargs["BLOCK_N"]), user) if ticket else None


def reduce_split_k(ws: torch.Tensor, cnt: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """After a launch with :func:`split_k_scratch`'s scratch: sum its partials (+ bias) into ``out`` unless
    the launch had no split-K or summed them itself (tickets)."""
    if ws is out or cnt is not None:
        return
    M, N = out.shape
    _gemv_splitk_reduce_kernel[(triton.cdiv(M * N, 1024),)](
        ws, bias if bias is not None else out, out, M, N, out.stride(0), HAS_BIAS=bias is not None,
        SPLIT_K=ws.shape[0], BLOCK=1024, num_warps=4)
