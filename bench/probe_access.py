"""Probe: how fast the int4 GEMV's access pattern alone can read its packed weights (issue 15: the GEMVs reach
35-51% of a copy at batch 1, and loading K steps ahead did not help, bench/results/2026-12-05-h200-s33/call1/).

Kernels that only read and sum int32 words, no dequantization, at the packed shapes of the 7B's projections
(qweight [N, K / 8]):
  rows  - the GEMV's pattern: program (n, s) reads BLOCK_N rows, K slice s in steps of BW words per row (each
          row one contiguous BW * 4-byte run a step, rows K / 2 bytes apart);
  tiled - the same programs and steps over the same words relaid so that each step's [BLOCK_N, BW] tile is one
          contiguous run (a layout a loader could write once);
  flat  - one contiguous run per program (the plain read ceiling of these bytes).
Each is timed as the tuner times kernels (kernels.tuning.graph_ms, cold where the bytes fit the L2) over a grid of
tiles, warps and pipeliner stages; per shape the best of each with its read rate, and a device-to-device copy of
the same bytes (read + write counted, as bench/probe_qkernels.py's "of copy"); the JSON holds every tile's time. If rows reads near the copy's rate
the pattern is not what holds the GEMV back; if tiled reads much faster, a tiled packed layout is worth building.

Usage on the GPU machine: python bench/probe_access.py --out access.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ggml_sweep import copy_gbps  # noqa: E402
from kernels.tuning import fits_l2, graph_ms, precompile  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}  # N, K


@triton.jit
def _read_kernel(w_ptr, out_ptr, N, KW, TILED: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr,
                 SPLIT: tl.constexpr, STAGES: tl.constexpr):
    pn, ps = tl.program_id(0), tl.program_id(1)
    steps = KW // BW
    per = tl.cdiv(steps, SPLIT)
    lo, hi = ps * per, tl.minimum(ps * per + per, steps)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BW)
    acc = tl.zeros((BLOCK_N, BW), tl.int32)
    for kb in tl.range(lo, hi, num_stages=STAGES):
        if TILED:  # tile (pn, kb) of the [N / BLOCK_N, steps, BLOCK_N, BW] layout
            base = (pn.to(tl.int64) * steps + kb) * (BLOCK_N * BW)
            ptrs = w_ptr + base + r[:, None] * BW + c[None, :]
        else:
            ptrs = w_ptr + (pn * BLOCK_N + r)[:, None].to(tl.int64) * KW + kb * BW + c[None, :]
        acc ^= tl.load(ptrs, eviction_policy="evict_first")
    tl.store(out_ptr + ps * N + pn * BLOCK_N + r, tl.xor_sum(acc, axis=1))


@triton.jit
def _flat_kernel(w_ptr, out_ptr, total, CHUNK: tl.constexpr, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in tl.range(0, CHUNK // BLOCK, num_stages=STAGES):
        acc ^= tl.load(w_ptr + base + i * BLOCK + tl.arange(0, BLOCK), eviction_policy="evict_first")
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


def read_candidates(n: int, kw: int) -> list[dict]:
    out = []
    for bn, bw, split, warps, stages in itertools.product((16, 32, 64, 128), (32, 64, 128), (1, 2, 4, 8), (4, 8),
                                                          (1, 3)):
        if n % bn or kw % bw or kw // bw < 2 * split:
            continue
        out.append(dict(BLOCK_N=bn, BW=bw, SPLIT=split, num_warps=warps, STAGES=stages))
    return out


def time_reads(n: int, k: int, dev: torch.device) -> dict:
    kw = k // 8
    w = torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device=dev)
    out = torch.empty(8 * n, dtype=torch.int32, device=dev)
    cold = fits_l2(w.nbytes, dev)
    result = {}
    for tiled in (False, True):
        cands = read_candidates(n, kw)

        def run(cfg, tiled=tiled):
            grid = (n // cfg["BLOCK_N"], cfg["SPLIT"])
            _read_kernel[grid](w, out, n, kw, TILED=tiled, **cfg)
        precompile(cands, run, dev)
        timed = [(graph_ms(lambda c=c: run(c), cold=cold), c) for c in cands]
        best = min(timed, key=lambda t: t[0])
        result["tiled" if tiled else "rows"] = dict(us=best[0] * 1e3, GBps=w.nbytes / best[0] / 1e6, config=best[1],
                                                    all=[dict(us=ms * 1e3, **c) for ms, c in timed])
    flat = []
    for chunk, block, warps, stages in itertools.product((8192, 16384, 65536), (1024, 2048), (4, 8), (1, 3)):
        if w.numel() % chunk:
            continue
        def run_flat(chunk=chunk, block=block, warps=warps, stages=stages):
            _flat_kernel[(w.numel() // chunk,)](w, out, w.numel(), CHUNK=chunk, BLOCK=block, STAGES=stages,
                                                num_warps=warps)
        run_flat()
        flat.append((graph_ms(run_flat, cold=cold), dict(CHUNK=chunk, BLOCK=block, num_warps=warps, STAGES=stages)))
    if flat:
        ms, cfg = min(flat, key=lambda t: t[0])
        result["flat"] = dict(us=ms * 1e3, GBps=w.nbytes / ms / 1e6, config=cfg)
    result["copy_GBps"] = copy_gbps(w.nbytes, dev)
    result["bytes"] = w.nbytes
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="probe_access.json")
    p.add_argument("--shapes", default=",".join(SHAPES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this probe needs a CUDA GPU")
    dev = torch.device("cuda")
    rows = {}
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"{'proj':8} {'MB':>6} {'pattern':6} {'us':>7} {'GB/s':>6} {'of copy':>7}  config")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        r = rows[name] = time_reads(n, k, dev)
        for pat in ("rows", "tiled", "flat"):
            if pat in r:
                x = r[pat]
                print(f"{name:8} {r['bytes'] / 1e6:6.1f} {pat:6} {x['us']:7.1f} {x['GBps']:6.0f} "
                      f"{100 * x['GBps'] / r['copy_GBps']:6.0f}%  {x['config']}", flush=True)
        print(f"{name:8} {'':6} copy   {'':7} {r['copy_GBps']:6.0f}  (read + write)", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       shapes=rows), f, indent=1)


if __name__ == "__main__":
    main()
