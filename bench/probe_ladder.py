"""Probe: what the int8-x GEMV (kernels/qgemv_i8.py) adds to reading its weights, one piece at a time (issue 15).

bench/probe_access.py read the 7B's packed int4 weights in the GEMV's own pattern at 97-111% of a copy (gate_up
17.5 us) while the GEMV takes twice that (35.2 us; bench/results/2026-12-05-h200-s33/). Here, batch 1, for each
tile and split of a small grid, the same programs and K steps as the GEMV:
  L0  read the step's packed words (xor into a register tile);
  L1  L0 + load the step's scales and zero points, as the GEMV does;
  L2  L1 + load x's int8 words, steps and code sums for the step, as the GEMV does;
  L3  the GEMV itself (kernels.qgemv_i8.launch_i8 with x already rounded: unpacking, dp4a, scaling, epilogue).
L0-L2 fold what they load into their result so nothing is dropped; their split-K parts are written, not summed.
Timed as the tuner times kernels (kernels.tuning.graph_ms, cold where the bytes fit the L2). The step from one
level to the next is what that piece costs; the first level far above L0 is where to work.

Usage on the GPU machine: python bench/probe_ladder.py --out ladder.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ggml_sweep import copy_gbps  # noqa: E402
from kernels import qgemv, qgemv_i8  # noqa: E402
from kernels.quant_x import quantize_x  # noqa: E402
from kernels.tuning import fits_l2, graph_ms, precompile  # noqa: E402
from tools.bench_quant import packed_operands  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}  # N, K
GROUP = 128
# BLOCK_N, BLOCK_K, warps, stages, register cap (0: none): the tuner's batch-1 tiles (with its caps: left alone,
# ptxas issues the scale, zero-point and x-step loads after the step's first dot products, kernels/qgemv.py),
# BLOCK_K 512 and narrower tiles (more programs, so more of the weights' bytes requested at once across the GPU:
# the read probe's best gate_up tile had twice the GEMV's bytes a K step), and the software pipeliner's cp.async
# stages on the small tiles. Session 32's loads two steps ahead in registers gained nothing; their sm_90 loop waits
# at its top on the scoreboard of the code loads it issued at its end, which the pipeliner's copies avoid.
# Session 34 (bench/results/2026-12-05-h200-s34/call2/): the capped 16x512 tile fastest at every projection, the
# pipelined tiles 1.25-2.3x slower (dropped since). BLOCK_K divides K here: the 1024-wide tiles stay with the tuner.
TILES = [(32, 256, 4, 1, 0), (32, 256, 8, 1, 0), (64, 256, 8, 1, 0), (128, 128, 4, 3, 0), (32, 256, 4, 1, 64),
         (32, 256, 8, 1, 48), (64, 256, 8, 1, 64), (32, 512, 8, 1, 0), (32, 512, 8, 1, 64), (16, 256, 4, 1, 0),
         (16, 512, 4, 1, 0), (16, 512, 4, 1, 64), (16, 512, 8, 1, 64)]


@triton.jit
def _ladder_kernel(xq_ptr, d_ptr, qs_ptr, q_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_qn, stride_sn,
                   LEVEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   GROUP_C: tl.constexpr, STAGES: tl.constexpr, WRAP: tl.constexpr = False):
    NBLK: tl.constexpr = BLOCK_K // 32
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # as the GEMVs since session 35: the tail block's rows clamped, no division; WRAP: session 34's ``% N``
    # (an integer division before the first load: bench/probe_pair.py times both)
    rows = offs_n % N if WRAP else tl.minimum(offs_n, N - 1)
    num_k = K // BLOCK_K
    per_split = tl.cdiv(num_k, SPLIT_K)
    kb_lo = tl.program_id(1) * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_k)
    b = tl.arange(0, NBLK)
    j = tl.arange(0, 4)
    q_rows = q_ptr + rows[:, None, None].to(tl.int64) * stride_qn
    s_rows = s_ptr + rows[:, None].to(tl.int64) * stride_sn
    z_rows = z_ptr + rows[:, None].to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_N, NBLK, 4), dtype=tl.int32)
    facc = tl.zeros((BLOCK_N, NBLK), dtype=tl.float32)
    for kb in tl.range(kb_lo, kb_hi, num_stages=STAGES):
        blk = kb * NBLK + b
        wcol = blk[None, :, None] * 4 + j[None, None, :]
        acc ^= tl.load(q_rows + wcol, eviction_policy="evict_first")
        if LEVEL >= 1:  # as the GEMV: one scale and zero point a row when GROUP_C is a multiple of BLOCK_K
            if GROUP_C % BLOCK_K == 0:
                g = (kb // (GROUP_C // BLOCK_K)) + tl.zeros((1, 1), tl.int32)
            else:
                g = (blk // (GROUP_C // 32))[None, :]
            facc += tl.load(s_rows + g).to(tl.float32) * tl.load(z_rows + g).to(tl.float32)
        if LEVEL >= 2:  # x's words for the step's columns, its blocks' steps and code sums
            x_lo = xq_ptr + wcol
            acc ^= tl.load(x_lo, eviction_policy="evict_last") ^ \
                tl.load(x_lo + tl.multiple_of(K // 8, 4), eviction_policy="evict_last")
            facc += tl.load(d_ptr + blk[None, :], eviction_policy="evict_last") * \
                tl.load(qs_ptr + blk[None, :], eviction_policy="evict_last").to(tl.float32)
    res = tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1).to(tl.float32) + tl.sum(facc, axis=1)
    tl.store(out_ptr + tl.program_id(1) * N + offs_n, res, mask=offs_n < N)


def splits(k: int, bk: int) -> list[int]:
    """Split-K factors with slices of at least two K steps (wider than the tuner's rule, kernels/qgemv.py, which
    splits only grids of up to 6 programs an SM: whether more programs in flight help is a question here)."""
    return [sk for sk in (1, 2, 4, 8) if k // bk >= 2 * sk]


def probe_shape(name: str, n: int, k: int, dev: torch.device) -> list[dict]:
    x, q, s, z = packed_operands(1, k, n, 4, GROUP, device="cuda")
    xq, d, qs = quantize_x(x)
    out = torch.empty(8 * n, device=dev, dtype=torch.float32)
    y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    cold = fits_l2(q.nbytes + s.nbytes + z.nbytes, dev)
    cases = [(bn, bk, w, st, cap, sk) for bn, bk, w, st, cap in TILES for sk in splits(k, bk)]

    def ladder(level, bn, bk, w, st, cap, sk):
        _ladder_kernel[(triton.cdiv(n, bn), sk)](xq, d, qs, q, s, z, out, n, k, q.stride(0), s.stride(0),
                                                 LEVEL=level, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_C=GROUP,
                                                 STAGES=st, num_warps=w, num_stages=st,
                                                 **({"maxnreg": cap} if cap else {}))

    def gemv(bn, bk, w, st, cap, sk):
        cfg = qgemv.config(bn, bk, sk, warps=w, stages=st, ticket=sk > 1, variant=4, maxnreg=cap or None)
        qgemv_i8.launch_i8(cfg, x, q, s, z, GROUP, None, y, False, True, rounded=(xq, d, qs))

    for level in range(3):
        precompile(cases, lambda c, level=level: ladder(level, *c), dev)
    precompile(cases, lambda c: gemv(*c), dev)
    rows = []
    for c in cases:
        runs = [lambda level=level: ladder(level, *c) for level in range(3)] + [lambda: gemv(*c)]
        us = [_timed(run, cold) for run in runs]
        rows.append(dict(proj=name, tile=list(c), us=us))
        print(f"{name:8} {c[0]:>4}x{c[1]:<4} w{c[2]} s{c[3]} r{c[4]:<3} sk{c[5]}  " +
              "  ".join("failed" if u is None else f"{u:6.1f}" for u in us), flush=True)
    copy = copy_gbps(q.nbytes, dev)
    for level in range(4):
        ok = [r for r in rows if r["us"][level] is not None]
        if not ok:
            print(f"{name:8} best L{level}: every tile failed", flush=True)
            continue
        best = min(ok, key=lambda r: r["us"][level])
        print(f"{name:8} best L{level}: {best['us'][level]:6.1f} us, {q.nbytes / best['us'][level] / 1e3:5.0f} GB/s "
              f"of codes ({100 * q.nbytes / best['us'][level] / 1e3 / copy:3.0f}% of copy), tile {best['tile']}",
              flush=True)
    return rows


def _timed(run, cold: bool) -> float | None:
    """us of one ``run()`` (kernels.tuning.graph_ms), or None when it fails (out of resources): the probe goes on."""
    try:
        return graph_ms(run, cold=cold) * 1e3
    except Exception as e:  # noqa: BLE001 - one tile's failure is a result, not the end of the probe
        print(f"  failed: {str(e).splitlines()[0][:160]}", flush=True)
        return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="probe_ladder.json")
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this probe needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"batch 1, int4 g{GROUP} zeros; us per level L0 L1 L2 L3 (module docstring)")
    rows = [r for name in args.shapes.split(",") for r in probe_shape(name, *SHAPES[name], dev)]
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
