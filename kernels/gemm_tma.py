# Prefill GEMM, Hopper variant: out = x @ w.T + bias with TMA tensor-descriptor loads
# and a persistent tile loop.  kernels.gemm is the public entry; it times this family
# against its pointer kernel on CUDA capability >= 9 and calls launch() here.
#
# Shapes:  x    [M, K]   row stride x.stride(0), unit stride along K
#          w    [N, K]   row-major, unit stride along K, 16-byte aligned row stride
#          acc  [M, N]   optional, any float dtype: added to the product before the store (may be out)
#          bias [N]      contiguous, optional
#          out  [M, N]   contiguous, dtype of x
# Dtypes:  bf16 / fp16 / fp32 (all the same); fp32 accumulation; fp32 dots use
#          input_precision="ieee".  Under the CPU interpreter bf16 tiles are upcast
#          first (UPCAST: it multiplies bf16 as raw bits).
# TMA:     host-side descriptors (triton.tools.tensor_descriptor.TensorDescriptor):
#          no device allocator, safe inside CUDA-graph capture (the encoded tensor map
#          is a by-value kernel parameter).  TMA needs 16-byte aligned base pointers
#          and row strides: eligible() checks that on the host and kernels.gemm falls
#          back to the pointer kernel otherwise.  Out-of-range rows / columns / K
#          are zero-filled by the loads and clipped by the store, so only the bias
#          load is masked; when out's row stride is not 16-byte aligned (N * esize
#          % 16) the epilogue uses a masked pointer store instead (TMA_STORE=0).
# Tiling:  [BLOCK_M, BLOCK_N] output tiles in grouped (GROUP_M) order; NUM_PROGS
#          programs (one per SM when persistent, else one per tile) walk tiles
#          tile = pid, pid + NUM_PROGS, ...; K loop of BLOCK_K = 128 bytes (the TMA
#          128-byte swizzle), software-pipelined over num_stages.  FLATTEN lets the
#          compiler pipeline across tiles (next tile's loads overlap this epilogue);
#          the epilogue recomputes its tile from its own counter so no value crosses
#          from the loads' pipeline stage into the store's.  SUBTILE stores the tile
#          as two [BLOCK_M, BLOCK_N/2] halves (half the epilogue shared memory).
#          WARP_SPEC asks for automatic warp specialization of the tile loop.
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.mma import mma_nt
from kernels.fastlaunch import fast

try:  # host-side tensor descriptors (present in triton 3.6, the GPU machine, and 3.9)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer kernel only
    TensorDescriptor = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# LAYERSTREAM_GEMM_TMA=0: the pointer family only. Each launch of this family builds three tensor descriptors on
# the host: in session 29's profile of a served 16-prompt pass (host-bound), 784 TMA GEMM launches took 155 ms of
# 674 ms, 198 us each against 89 us for the average launch (bench/results/2026-12-04-h200-s29/call4/1old/passprof)
_ENABLED = os.environ.get("LAYERSTREAM_GEMM_TMA", "1") != "0"
_SMEM_BYTES = 227 * 1024  # largest opt-in shared memory per block (H100/H200)
_INTERPRET_PROGS = 4  # "SM count" under the interpreter: persistent programs take several tiles
# (BLOCK_M, BLOCK_N, num_warps, num_stages, persistent, FLATTEN, SUBTILE, WARP_SPEC)
_SHAPES = [
    (128, 256, 8, 3, True, True, False, False),
    (128, 256, 8, 4, True, True, True, False),
    (128, 256, 8, 3, True, False, False, False),
    (256, 128, 8, 3, True, True, False, False),
    (128, 128, 8, 4, True, True, False, False),
    (128, 128, 4, 4, True, True, False, False),
    (128, 256, 8, 3, False, False, False, False),
    (128, 256, 8, 3, True, False, False, True),  # warp-specialized (no flatten: Hopper)
]


def config(bm: int, bn: int, bk: int, warps: int = 4, stages: int = 3, persistent: bool = True,
           flatten: bool = False, subtile: bool = False, warp_spec: bool = False) -> triton.Config:
    """One launch config of this family (TMA=True tells kernels.gemm which launcher runs it)."""
    return triton.Config({"TMA": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                          "PERSISTENT": persistent, "FLATTEN": flatten, "SUBTILE": subtile,
                          "WARP_SPEC": warp_spec}, num_warps=warps, num_stages=stages)


def candidates(esize: int) -> list[triton.Config]:
    """Configs worth timing for element size esize; pipelines that cannot fit shared memory are dropped."""
    bk = 128 // esize
    out = []
    for bm, bn, warps, stages, persistent, flatten, subtile, ws in _SHAPES:
        epilogue = bm * bn * esize // (2 if subtile else 1)
        if stages * (bm + bn) * bk * esize + epilogue > _SMEM_BYTES:
            continue
        out.append(config(bm, bn, bk, warps, stages, persistent, flatten, subtile, ws))
    return out


@functools.cache
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def device_ok(x: torch.Tensor) -> bool:
    """True when x's device can run this family: descriptors exist, capability >= 9 or the interpreter, and
    ``LAYERSTREAM_GEMM_TMA`` is not 0."""
    if TensorDescriptor is None or not _ENABLED:
        return False
    return _capability_ok(x.device.index or 0) if x.is_cuda else _INTERPRET


def eligible(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """True when this call may use the TMA family: device_ok and 16-byte aligned operands."""
    return device_ok(x) and _aligned(x) and _aligned(w) and out.data_ptr() % 16 == 0


@triton.jit
def _tile_coords(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M tile rows advance together along N (w tiles shared in L2)."""
    group = GROUP_M * grid_n
    first_m = (tile // group) * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % group) % rows, (tile % group) // rows


# NUM_PROGS (min(tiles, SMs)) is not specialised: below the SM count it is the tile count, whose divisibility by 16
# changes with M inside a tuning bucket (the 7B AWQ's down tiles of 1,200 rows: 80 programs at 2,047-2,048 rows, 75
# at 1,857), and each such value built a kernel in a warmed-up server's pass (H200, session 21)
@triton.jit(do_not_specialize=["NUM_PROGS"])
def _gemm_tma_kernel(
    x_desc, w_desc, o_desc, b_ptr, o_ptr, a_ptr,
    M, N, K, stride_om, stride_am, NUM_PROGS,
    HAS_BIAS: tl.constexpr, HAS_ACC: tl.constexpr, IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_STORE: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPEC: tl.constexpr,
):
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_c = tl.program_id(0) - NUM_PROGS  # the epilogue's own tile counter (see header)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGS,
                         flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_tiles):
            a = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            acc = mma_nt(a, b, acc, IS_FP32, UPCAST)

        tile_c += NUM_PROGS
        pid_m, pid_n = _tile_coords(tile_c, grid_m, grid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_ACC:  # a running sum added in (kernels.gemm's acc), read before the tile is stored
            acc += tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :],
                           mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
        c = acc.to(o_ptr.dtype.element_ty)
        if not TMA_STORE:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], c, mask=mask)
        elif SUBTILE:
            c0, c1 = tl.split(tl.permute(tl.reshape(c, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c0)
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], c1)
        else:
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], c)


def _desc(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    return TensorDescriptor(t, [t.shape[0], t.shape[1]], [t.stride(0), 1], [rows, cols])


def launch(cfg: triton.Config, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor, acc: torch.Tensor | None = None) -> None:
    """Run one config of this family into out, plus ``acc`` [M, N] where given (the caller checked
    eligible())."""
    kw = cfg.kwargs
    (M, K), N = x.shape, w.shape[0]
    bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    progs = tiles
    if kw["PERSISTENT"]:
        progs = min(tiles, _num_sms(x.device.index or 0) if x.is_cuda else _INTERPRET_PROGS)
    # a running sum (acc, or an fp32 out) stores through pointers: candidates() budgets shared memory for an epilogue
    # tile of x's element size, and the tuner times such a call with an fp32 out (kernels.gemm._gemm), so every
    # piece of a K-chunked product runs the epilogue its config was timed with (a TMA store beside the acc load
    # asked 344 KB of shared memory on an H100: bench/results/2026-12-06-h100-s46/call2)
    tma_store = (out.stride(0) * out.element_size()) % 16 == 0 and out.dtype == x.dtype and acc is None
    o_desc = _desc(out, bm, bn // 2 if kw["SUBTILE"] else bn) if tma_store else out
    _gemm_tma_launch[(progs,)](
        _desc(x, bm, bk), _desc(w, bn, bk), o_desc, bias if bias is not None else out, out,
        out if acc is None else acc, M, N, K, out.stride(0), out.stride(0) if acc is None else acc.stride(0), progs,
        HAS_BIAS=bias is not None, HAS_ACC=acc is not None, IS_FP32=x.dtype == torch.float32,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=kw["GROUP_M"], TMA_STORE=tma_store,
        SUBTILE=kw["SUBTILE"], FLATTEN=kw["FLATTEN"], WARP_SPEC=kw["WARP_SPEC"],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_gemm_tma_launch = fast(_gemm_tma_kernel)  # launched through kernels.fastlaunch
