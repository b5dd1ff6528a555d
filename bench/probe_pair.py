"""Probe: why the ladder's L0 (bench/probe_ladder.py) reads the 7B's packed codes up to 1.6x slower than the access
probe's rows kernel (bench/probe_access.py) in the same tile (issue 15).

Session 34 (bench/results/2026-12-05-h200-s34/call2/), one call, the same 32x256 tile at 8 warps and split 4:
gate_up L0 27.8 us against rows 17.6 us, qkv 6.7 against 4.0 us. Compiled for sm_90 under Triton 3.6 the two K loops
are the same instructions (bench/results/2026-12-05-cpu-sass-pair/); the kernels differ only in their prologue (the
ladder wraps rows with ``% N``), epilogue and unused arguments, and the probes in their operands (the ladder's from
tools.bench_quant.packed_operands, the access probe's a fresh torch.randint) and in what ran before each timing.

Here, per projection and tile, six timings alternated in rounds so that order and clocks fall on all alike:
  access(w)   the access probe's rows kernel on its own operand;
  ladder(q)   the ladder's L0 on packed_operands' codes, rows wrapped by ``% N`` (session 34's probe_ladder);
  access(q)   the access kernel on the ladder's codes;
  ladder(w)   the ladder's L0 (wrapped) on the access probe's operand;
  clamped(q)  the ladder's L0 with its rows clamped instead (the GEMVs' prologue since session 35: no integer
              division before the first load);
  gemv(q)     the real GEMV (kernels.qgemv_i8, x already rounded) in the same tile.
If access(w) = ladder(w) and access(q) = ladder(q), the operands differ (where they live, not what they hold); if
access(*) < ladder(*), the kernels do, and clamped(q) against ladder(q) says how much of it is the division; if all
agree, session 34's gap came from the order of the timings.

Usage on the GPU machine: python bench/probe_pair.py --out pair.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.probe_access import SHAPES, _read_kernel  # noqa: E402
from bench.probe_ladder import GROUP, _ladder_kernel  # noqa: E402
from kernels import qgemv, qgemv_i8  # noqa: E402
from kernels.quant_x import quantize_x  # noqa: E402
from kernels.tuning import fits_l2, graph_ms  # noqa: E402
from tools.bench_quant import packed_operands  # noqa: E402

TILES = [(32, 256, 8, 4), (16, 512, 4, 2), (32, 256, 4, 4)]  # BLOCK_N, BLOCK_K (codes), warps, split-K


def runners(n: int, k: int, tile: tuple, dev: torch.device) -> dict:
    """The five launches of one projection and tile, each a no-argument callable."""
    bn, bk, warps, sk = tile
    x, q, s, z = packed_operands(1, k, n, 4, GROUP, device=dev.type)
    w = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev)
    xq, d, qs = quantize_x(x)
    out_f = torch.empty(8 * n, device=dev, dtype=torch.float32)
    out_i = torch.empty(8 * n, device=dev, dtype=torch.int32)
    y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    cfg = qgemv.config(bn, bk, sk, warps=warps, stages=1, ticket=sk > 1, variant=4)

    def access(codes):
        _read_kernel[(n // bn, sk)](codes, out_i, n, k // 8, TILED=False, BLOCK_N=bn, BW=bk // 8, SPLIT=sk, STAGES=1,
                                    num_warps=warps)

    def ladder(codes, wrap=True):
        _ladder_kernel[(triton.cdiv(n, bn), sk)](xq, d, qs, codes, s, z, out_f, n, k, codes.stride(0), s.stride(0),
                                                 LEVEL=0, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_C=GROUP, STAGES=1,
                                                 WRAP=wrap, num_warps=warps, num_stages=1)

    return {"access(w)": lambda: access(w), "ladder(q)": lambda: ladder(q), "access(q)": lambda: access(q),
            "ladder(w)": lambda: ladder(w), "clamped(q)": lambda: ladder(q, wrap=False),
            "gemv(q)": lambda: qgemv_i8.launch_i8(cfg, x, q, s, z, GROUP, None, y, False, True, rounded=(xq, d, qs)),
            "_bytes": q.nbytes, "_cold": fits_l2(q.nbytes + s.nbytes + z.nbytes, dev),
            "_ptrs": {"q": q.data_ptr() % 4096, "w": w.data_ptr() % 4096}}


def probe(name: str, tile: tuple, rounds: int, dev: torch.device) -> dict:
    n, k = SHAPES[name]
    r = runners(n, k, tile, dev)
    names = [a for a in r if not a.startswith("_")]
    times: dict[str, list[float]] = {a: [] for a in names}
    for i in range(rounds):
        order = names if i % 2 == 0 else names[::-1]
        for a in order:
            times[a].append(graph_ms(r[a], cold=r["_cold"]) * 1e3)
    med = {a: statistics.median(v) for a, v in times.items()}
    print(f"{name:8} {tile[0]:>3}x{tile[1]:<4} w{tile[2]} sk{tile[3]}  " +
          "  ".join(f"{a} {med[a]:6.1f}" for a in names) + f"   (us, median of {rounds}; {r['_bytes'] / 1e6:.1f} MB, "
          f"{'cold' if r['_cold'] else 'hot'}, q/w at {r['_ptrs']['q']}/{r['_ptrs']['w']} mod 4096)", flush=True)
    return dict(proj=name, tile=list(tile), us=times, median=med, bytes=r["_bytes"], cold=r["_cold"])


def cli(probe_fn, doc: str, out: str, shapes: str, tiles: list, argv: list[str] | None = None) -> None:
    """The probes' command line: ``probe_fn(name, tile, rounds, dev)`` per shape and tile, rows into --out."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=out)
    p.add_argument("--shapes", default=shapes)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this probe needs a CUDA GPU")
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    rows = [probe_fn(name, tile, args.rounds, dev) for name in args.shapes.split(",") for tile in tiles]
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)


def main(argv: list[str] | None = None) -> None:
    cli(probe, __doc__, "probe_pair.json", "gate_up,qkv", TILES, argv)


if __name__ == "__main__":
    main()
