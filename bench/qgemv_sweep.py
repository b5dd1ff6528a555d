"""Wide launch-config sweep of the int4 decode GEMV (kernels/qgemv.py), beyond the tuner's candidates.

The tuner's candidates reached 30-34% of a copy's rate on the packed bytes at batch 1 on the H200
(bench/results/2026-12-01-h200-s7-quant/probe_qkernels.txt; issue 15's target: 75%). This sweeps a
wider grid at the Qwen2.5-7B projections (int4, group 128, zero points, bf16 x, M = 1 by default):
variant 1 ("3d", software-pipelined) over BLOCK_N x BLOCK_K x num_warps x stages, and split-K where
the grid leaves the SMs short of programs; variant 0 over its FMA tiles. Each candidate is compiled
(in parallel: kernels.tuning.precompile), checked against fp32 ``x @ dequant_ref(w).T`` and timed as
the tuner times it (kernels.tuning.graph_ms, cold where the operands fit twice the L2); a time budget
bounds the sweep. Printed per shape: the tuner's own pick, the sweep's best, their rates on the
packed bytes and fractions of a device-to-device copy of those bytes.

    python bench/qgemv_sweep.py --budget-s 300 --out qgemv_sweep.json      (GPU machine)

"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK_NS, BLOCK_KS, WARPS, STAGES, SPLITS = (8, 16, 32, 64, 128, 256), (128, 256, 512, 1024), (4, 8), (2, 3, 4), (2, 4)
MAX_REL_ERR = 1.5e-2  # variant 4 rounds x to int8 (about 0.5% here)


def candidates(n: int, k: int, sms: int, variants: tuple[int, ...] = (1,)) -> list:
    """Variants 1 ("3d") and 4 ("i8x", tiles up to 512 rows) over the grid (a tile of at most 64K codes),
    split-K while the grid has fewer than 4 programs an SM; variant 0 over its FMA tiles."""
    from kernels import qgemv as q
    from kernels.qgemv_candidates import _FMA_SHAPES
    out = []
    for v in variants:
        for bn in (32, 64, 128, 256, 512) if v == 4 else BLOCK_NS:
            for bk in BLOCK_KS:
                if bn * bk > 65536 or bk > k or v == 4 and bk > 256:
                    continue
                for warps in WARPS:
                    for stages in (1, 2, 3) if v == 4 else STAGES:  # variant 4 may do without the pipeliner
                        out.append(q.config(bn, bk, 1, warps=warps, stages=stages, variant=v))
                        out += [q.config(bn, bk, s, warps=warps, stages=stages, ticket=True, variant=v)
                                for s in SPLITS if -(-n // bn) * s // 2 < 4 * sms and -(-k // bk) >= 2 * s]
    out += [q.config(bn, bk, 1, warps=w, stages=2) for bn, bk, w, _ in _FMA_SHAPES]
    return out


def label(cfg) -> str:
    kw = cfg.kwargs
    return f"v{kw['VARIANT']} BN{kw['BLOCK_N']} BK{kw['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} sk{kw['SPLIT_K']}"


def sweep_shape(name: str, k: int, n: int, m: int, sms: int, deadline: float, variants: tuple[int, ...] = (1,)) -> dict:
    from bench.ggml_sweep import copy_gbps
    from kernels import qgemv as q
    from kernels.quant_common import dequant_ref
    from kernels.tuning import fits_l2, graph_ms, precompile
    from tools.bench_quant import packed_operands

    x, qw, s, z = packed_operands(m, k, n, 4, 128)
    ref = x.float() @ dequant_ref(qw, s, z, 4).T
    nbytes = qw.nbytes + s.nbytes + z.nbytes
    cold = fits_l2(nbytes, x.device)
    cands = candidates(n, k, sms, variants)
    precompile(cands, lambda c: q._qgemv(x, qw, s, z, 4, cfg=c), x.device)
    timed, failed = [], 0
    for cfg in cands:
        if time.perf_counter() > deadline:
            break
        try:
            out = q._qgemv(x, qw, s, z, 4, cfg=cfg)
            if not ((out.float() - ref).norm() / ref.norm()).item() < MAX_REL_ERR:
                failed += 1
                continue
            timed.append((graph_ms(lambda c=cfg: q._qgemv(x, qw, s, z, 4, cfg=c), cold=cold) * 1e3, label(cfg)))
        except Exception:  # noqa: BLE001 - a config this GPU cannot compile or run (e.g. shared memory)
            failed += 1
    q._TUNED.clear()
    tuner_us = graph_ms(lambda: q.qgemv(x, qw, s, z, 4), cold=cold) * 1e3  # the tuner's pick, as the engine runs
    copy = copy_gbps(nbytes, x.device)
    timed.sort()
    row = {"proj": name, "M": m, "K": k, "N": n, "packed_bytes": nbytes, "copy_GBps": copy, "candidates": len(cands),
           "timed": len(timed), "failed": failed, "tuner_us": tuner_us, "tuner_of_copy": nbytes / tuner_us / 1e3 / copy,
           "top": [{"config": c, "us": us, "of_copy": nbytes / us / 1e3 / copy} for us, c in timed[:8]]}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/qgemv_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1", help="decode rows M, comma-separated")
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--variants", default="1,4", help="qgemv variants to sweep: 1 (3d), 4 (i8x)")
    p.add_argument("--out", default="qgemv_sweep.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    from tools.bench_quant import QWEN7B_QUANT
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    deadline = time.perf_counter() + args.budget_s
    rows = []
    for m in [int(b) for b in args.batches.split(",")]:
        for name, k, n in sorted(QWEN7B_QUANT, key=lambda t: -t[1] * t[2]):  # the largest weights first
            if time.perf_counter() > deadline:
                break
            r = sweep_shape(name, k, n, m, sms, deadline, tuple(int(v) for v in args.variants.split(",")))
            rows.append(r)
            best = r["top"][0] if r["top"] else None
            print(f"{name:8} M={m} tuner {r['tuner_us']:7.1f} us ({100 * r['tuner_of_copy']:4.0f}% of copy) | best "
                  + (f"{best['us']:7.1f} us ({100 * best['of_copy']:4.0f}%) {best['config']}" if best else "none")
                  + f" | {r['timed']}/{r['candidates']} timed, {r['failed']} failed", flush=True)
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(args.out + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
