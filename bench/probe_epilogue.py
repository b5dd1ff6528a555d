"""Probe: whether the ladder's L0 reads the 7B's packed codes 1.4-1.6x slower than the access probe's rows kernel
because of its epilogue (issue 15's int4 GEMV at 44-62% of a copy).

bench/probe_pair.py (bench/results/2026-12-05-h200-s36/call1/) timed the two in the same tiles on each other's
operands: gate_up 17.5 us (access) against 24.5-28.2 us (ladder L0), whatever the operand. Compiled for sm_90 their
K loops are the same instructions (bench/sass_pair.py); what differs is the epilogue: the ladder's [BLOCK_N, NBLK,
4] tile is reduced over two axes and its (zero) fp32 tile summed too, four barriers and three rounds through shared
memory, where the access kernel reduces a [BLOCK_N, BW] tile with one. Each program reads only 4-7 K steps, so its
epilogue is a large part of its life.

One kernel, the same K loop (a step's BLOCK_N x BW words xored into a register tile), in five forms:
  2d      the access kernel's tile [BLOCK_N, BW], one xor reduction (= bench/probe_access.py's rows)
  2d+f    2d and a zero fp32 [BLOCK_N, BW / 4] tile summed into the result (the ladder's second reduction)
  3d      the ladder's tile [BLOCK_N, BW / 4, 4], reduced over its last two axes
  3d+f    3d and the zero fp32 tile (= the ladder's L0, bench/probe_ladder.py)
  3d>2d   the 3d tile reshaped to [BLOCK_N, BW] before one reduction
and the GEMV (kernels.qgemv_i8, x already rounded) in the same tile. Timed as the tuner times kernels
(kernels.tuning.graph_ms, cold), alternated in rounds. If 3d or +f alone is slow, the GEMV's epilogue is where to
work; if all five agree with 2d, the gap is elsewhere (then compare what ran before each timing).

Usage on the GPU machine: python bench/probe_epilogue.py --out epilogue.json
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.probe_access import SHAPES  # noqa: E402
from bench.probe_ladder import GROUP  # noqa: E402
from bench.probe_pair import cli  # noqa: E402
from kernels import qgemv, qgemv_i8  # noqa: E402
from kernels.quant_x import quantize_x  # noqa: E402
from kernels.tuning import fits_l2, graph_ms  # noqa: E402
from tools.bench_quant import packed_operands  # noqa: E402

TILES = [(32, 256, 8, 4), (16, 512, 4, 2), (16, 512, 4, 1)]  # BLOCK_N, BLOCK_K (codes), warps, split-K
FORMS = {"2d": (False, False, False, False), "2d+f": (False, True, False, False), "3d": (True, False, False, False),
         "3d+f": (True, True, False, False), "3d>2d": (True, False, True, False),
         "3dT": (True, False, False, True)}  # THREE_D, FACC, FLATTEN, TRANS


@triton.jit
def _epi_kernel(q_ptr, out_ptr, N, KW, stride_qn, THREE_D: tl.constexpr, FACC: tl.constexpr, FLATTEN: tl.constexpr,
                BLOCK_N: tl.constexpr, BW: tl.constexpr, SPLIT: tl.constexpr, TRANS: tl.constexpr = False):
    NB: tl.constexpr = BW // 4
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    steps = KW // BW
    per = tl.cdiv(steps, SPLIT)
    lo, hi = tl.program_id(1) * per, tl.minimum(tl.program_id(1) * per + per, steps)
    if TRANS:  # the 3-D tile with its axes [NBLK, BLOCK_N, 4]: sm_90's layout then puts the lanes along a row
        ptrs = q_ptr + rows[None, :, None].to(tl.int64) * stride_qn + \
            (tl.arange(0, NB)[:, None, None] * 4 + tl.arange(0, 4)[None, None, :])
        acc = tl.zeros((NB, BLOCK_N, 4), tl.int32)
    elif THREE_D:
        ptrs = q_ptr + rows[:, None, None].to(tl.int64) * stride_qn + \
            (tl.arange(0, NB)[None, :, None] * 4 + tl.arange(0, 4)[None, None, :])
        acc = tl.zeros((BLOCK_N, NB, 4), tl.int32)
    else:
        ptrs = q_ptr + rows[:, None].to(tl.int64) * stride_qn + tl.arange(0, BW)[None, :]
        acc = tl.zeros((BLOCK_N, BW), tl.int32)
    facc = tl.zeros((BLOCK_N, NB), tl.float32)
    for kb in tl.range(lo, hi, num_stages=1):
        acc ^= tl.load(ptrs + kb * BW, eviction_policy="evict_first")
    if TRANS:
        res = tl.xor_sum(tl.xor_sum(acc, axis=2), axis=0).to(tl.float32)
    elif THREE_D and FLATTEN:
        res = tl.xor_sum(tl.reshape(acc, (BLOCK_N, BW)), axis=1).to(tl.float32)
    elif THREE_D:
        res = tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1).to(tl.float32)
    else:
        res = tl.xor_sum(acc, axis=1).to(tl.float32)
    if FACC:
        res += tl.sum(facc, axis=1)
    tl.store(out_ptr + tl.program_id(1) * N + offs_n, res, mask=offs_n < N)


def launch(form: str, q: torch.Tensor, out: torch.Tensor, tile: tuple) -> None:
    """One launch of ``form`` over the codes q [N, K / 8] in ``tile``; out fp32 [SPLIT * N] or more."""
    bn, bk, warps, sk = tile
    three_d, facc, flatten, trans = FORMS[form]
    n, kw = q.shape
    _epi_kernel[(triton.cdiv(n, bn), sk)](q, out, n, kw, q.stride(0), THREE_D=three_d, FACC=facc, FLATTEN=flatten,
                                          BLOCK_N=bn, BW=bk // 8, SPLIT=sk, TRANS=trans, num_warps=warps, num_stages=1)


def probe(name: str, tile: tuple, rounds: int, dev: torch.device) -> dict:
    n, k = SHAPES[name]
    bn, bk, warps, sk = tile
    x, q, s, z = packed_operands(1, k, n, 4, GROUP, device=dev.type)
    xq, d, qs = quantize_x(x)
    out = torch.empty(8 * n, device=dev, dtype=torch.float32)
    y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    cfg = qgemv.config(bn, bk, sk, warps=warps, stages=1, ticket=sk > 1, variant=4)
    runs = {f: (lambda f=f: launch(f, q, out, tile)) for f in FORMS}
    def gemv(words2d: bool, trans: bool = False) -> None:
        qgemv_i8.WORDS2D, qgemv_i8.TRANS = words2d, trans
        qgemv_i8.launch_i8(cfg, x, q, s, z, GROUP, None, y, False, True, rounded=(xq, d, qs))

    runs["gemv"] = lambda: gemv(False)  # the codes loaded as a 3-D tile
    runs["gemv2d"] = lambda: gemv(True)  # as a 2-D tile, viewed as 3-D (kernels/qgemv_i8.py's WORDS2D)
    runs["gemvT"] = lambda: gemv(False, True)  # the tile's axes [NBLK, BLOCK_N, 4] (kernels/qgemv_i8.py's TRANS)
    cold = fits_l2(q.nbytes + s.nbytes + z.nbytes, dev)
    times: dict[str, list[float]] = {a: [] for a in runs}
    for i in range(rounds):
        for a in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[a].append(graph_ms(runs[a], cold=cold) * 1e3)
    med = {a: statistics.median(v) for a, v in times.items()}
    print(f"{name:8} {bn:>3}x{bk:<4} w{warps} sk{sk}  " + "  ".join(f"{a} {med[a]:6.1f}" for a in runs) +
          f"   (us, median of {rounds}; {q.nbytes / 1e6:.1f} MB, {'cold' if cold else 'hot'})", flush=True)
    return dict(proj=name, tile=list(tile), us=times, median=med, bytes=q.nbytes, cold=cold)


def main(argv: list[str] | None = None) -> None:
    cli(probe, __doc__, "probe_epilogue.json", "gate_up,qkv,down", TILES, argv)


if __name__ == "__main__":
    main()
