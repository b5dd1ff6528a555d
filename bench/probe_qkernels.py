"""Probe: every variant of the quantized matmuls (kernels/quant_variants.py) at Qwen2.5-7B int4 shapes.

For the qkv / o / gate_up / down projections (tools/bench_quant.py's QWEN7B_QUANT and packed_operands:
int4, group 128, zero points, bf16 x) at M = 1, 4, 16 (kernels/qgemv.py) and M = 2048
(kernels/qgemm.py), every tuning candidate of every variant is timed as the tuner times it
(kernels.tuning.graph_ms: CUDA-graph replays, cold after an L2-sized read where the operands fit
twice the L2), after compiling them all in parallel (kernels.tuning.precompile).  Per variant the
best config is reported with its time, its ratio to bf16 ``F.linear`` on the dequantized weight
(peer us / ours), for qgemv the rate on the packed bytes (codes, scales, zeros) and its fraction of a
device-to-device copy measured on the same bytes in the same run (copy rate counted read + write, as
tools/bench_kernels.py's ceiling), and the largest relative error (Frobenius) of any of the
variant's candidates against fp32 ``x @ dequant_ref(w).T``.  With ``--ggml`` (default: q4_k,q6_k), each
decode batch (M <= 64) also times kernels/ggml_gemv.py on random GGUF blocks of those types at the same
shapes (its one fixed launch config), with the rate on the block bytes and its fraction of a copy of them.
The int8-x GEMV (variant 4) is also timed as ``i8x-alone``: its kernel with x already rounded to int8, as the
engine's qkv and gate_up get it from the fused RMSNorm (kernels/add_rmsnorm_i8.py), without the rounding launch.
With ``--ggml-sweep`` only kernels/ggml_gemv.py runs: its launch configs swept per (qtype, M, GGUF
tensor shape) within ``--budget-s`` seconds (bench/ggml_sweep.py), the best one per case written out.

Usage on the GPU machine: python bench/probe_qkernels.py --out probe.json
                          python bench/probe_qkernels.py --ggml-sweep --budget-s 150 --out sweep.json
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import qgemm as qgemm_mod  # noqa: E402
from kernels import qgemv as qgemv_mod  # noqa: E402
from kernels import qgemv_i8  # noqa: E402
from kernels.quant_x import quantize_x  # noqa: E402
from engine.gguf.random_blocks import random_blocks  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from kernels import ggml_blocks  # noqa: E402
from kernels.ggml_gemv import ggml_gemv  # noqa: E402
from kernels.quant_common import dequant_ref  # noqa: E402
from kernels.tuning import fits_l2, graph_ms, precompile  # noqa: E402
from tools.bench_quant import QWEN7B_QUANT, packed_operands  # noqa: E402
from bench.ggml_sweep import SWEEP_QTYPES, copy_gbps, run_sweep, sweep_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="probe_qkernels.json", help="JSON file to write (default: %(default)s)")
    p.add_argument("--batches", default="1,4,16,2048",
                   help="token counts, comma-separated; <= 64 runs qgemv, more runs qgemm (default: %(default)s)")
    p.add_argument("--shapes", default=",".join(n for n, _, _ in QWEN7B_QUANT),
                   help="projections of Qwen2.5-7B to probe (default: %(default)s)")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="code width (default: %(default)s)")
    p.add_argument("--group", type=int, default=128, help="quantization group size (default: %(default)s)")
    p.add_argument("--ggml", default="q4_k,q6_k",
                   help="GGUF block types to time kernels/ggml_gemv.py on at M <= 64, '' for none (default: %(default)s)")
    p.add_argument("--ggml-sweep", action="store_true",
                   help="only sweep kernels/ggml_gemv.py's launch configs (bench/ggml_sweep.py)")
    p.add_argument("--sweep-qtypes", default=",".join(SWEEP_QTYPES),
                   help="GGUF block types the sweep covers (default: %(default)s)")
    p.add_argument("--sweep-batches", default="1,4,16",
                   help="token counts (1..64) the sweep covers (default: %(default)s)")
    p.add_argument("--sweep-caps", default="",
                   help="register caps (Triton's maxnreg, multiples of 8 in 32..255) the sweep also tries at M = 1, "
                        "comma-separated, e.g. 64,96 (default: none)")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="seconds the sweep may take; the cases left then are listed as skipped "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    _check_sweep_args(p, args)
    args.ggml = [t for t in args.ggml.split(",") if t]
    if any(t not in ggml_blocks.BLOCKS for t in args.ggml):
        p.error(f"--ggml must name some of {', '.join(ggml_blocks.BLOCKS)}, got {','.join(args.ggml)!r}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches needs at least one count, each >= 1")
    known = {n: (k, nn) for n, k, nn in QWEN7B_QUANT}
    args.shapes = [s for s in args.shapes.split(",") if s]
    if not args.shapes or any(s not in known for s in args.shapes):
        p.error(f"--shapes must name some of {', '.join(known)}, got {','.join(args.shapes)!r}")
    if any(known[s][0] % args.group for s in args.shapes):
        p.error(f"--group {args.group} must divide every probed K ({[known[s][0] for s in args.shapes]})")
    return args


def _check_sweep_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.sweep_qtypes = [t for t in args.sweep_qtypes.split(",") if t]
    if not args.sweep_qtypes or any(t not in ggml_blocks.BLOCKS for t in args.sweep_qtypes):
        p.error(f"--sweep-qtypes must name some of {', '.join(ggml_blocks.BLOCKS)}, "
                f"got {','.join(args.sweep_qtypes)!r}")
    try:
        args.sweep_batches = [int(b) for b in args.sweep_batches.split(",") if b]
    except ValueError:
        p.error(f"--sweep-batches must be comma-separated integers, got {args.sweep_batches!r}")
    if not args.sweep_batches or not all(1 <= b <= 64 for b in args.sweep_batches):
        p.error("--sweep-batches needs at least one count, each in 1..64")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    try:
        args.sweep_caps = tuple(int(c) for c in args.sweep_caps.split(",") if c)
    except ValueError:
        p.error(f"--sweep-caps must be comma-separated integers, got {args.sweep_caps!r}")
    if not all(32 <= c <= 255 and c % 8 == 0 for c in args.sweep_caps):
        p.error(f"--sweep-caps: each cap a multiple of 8 in 32..255, got {args.sweep_caps}")


def variant_name(cfg, gemv_m1: bool) -> str:
    """base / swap / 3d / i8x / split / split+swap."""
    v, swap = cfg.kwargs.get("VARIANT", 0), cfg.kwargs.get("SWAP_AB", False)
    if gemv_m1:
        return {0: "base", 1: "3d", 4: "i8x"}[v]
    return ("split" if v == 3 else "base" if not swap else "swap") + ("+swap" if v == 3 and swap else "")


BAD_ERR = 1e-2  # a candidate further than this from fp32 torch is listed by name (the tuner's accept: 2e-2)
BAD_ERR_I8X = 2e-2  # variant 4 rounds x to int8 (about 0.5-1% on its own)


def cfg_name(cfg) -> str:
    keep = {k: v for k, v in cfg.kwargs.items() if k not in ("VARIANT", "TICKET")}
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in keep.items()) + \
        f" w{cfg.num_warps} s{cfg.num_stages}"


def time_candidates(cands: list, run, ref: torch.Tensor, out: torch.Tensor, cold: bool, gemv_m1: bool) -> dict:
    """{variant: {"best": (us, cfg name), "err": max rel err, "timed": n, "failed": n}}."""
    precompile(cands, run, out.device)
    res: dict[str, dict] = {}
    for cfg in cands:
        r = res.setdefault(variant_name(cfg, gemv_m1), {"best": None, "err": 0.0, "timed": 0, "failed": 0})
        try:
            run(cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            us = graph_ms(lambda c=cfg: run(c), cold=cold) * 1e3
            err = max(err, ((out.float() - ref).norm() / ref.norm()).item())  # after the replays too (races)
        except Exception as e:  # noqa: BLE001 - a config this GPU cannot run (e.g. out of shared memory)
            r["failed"] += 1
            r.setdefault("errors", []).append(f"{cfg_name(cfg)}: {type(e).__name__}")
            continue
        r["timed"] += 1
        r["err"] = max(r["err"], err)
        if err > (BAD_ERR_I8X if variant_name(cfg, gemv_m1) == "i8x" else BAD_ERR):
            r.setdefault("bad", []).append(f"{cfg_name(cfg)}: {err:.1e}")
        if r["best"] is None or us < r["best"][0]:
            r["best"] = (us, cfg_name(cfg))
    return res


def balanced_i8(n: int, k: int, sms: int) -> list:
    """Probe-only int8-x tiles (not the tuner's): a split-K that divides K's steps evenly and fills >= 90% of whole
    waves of ``sms`` programs. The 7B's o_proj (3,584 rows) in 16-row blocks is 224 programs on 132 SMs, which
    fill 85% of two; split 7 ways (3,584 = 7 x 512) it is 1,568, 99% of twelve."""
    out = []
    for bn, bk, warps, regs in ((16, 512, 4, 64), (16, 256, 4, 64), (32, 512, 8, 64), (8, 512, 4, 96)):
        steps = k // bk
        for sk in (range(2, steps + 1) if k % bk == 0 else ()):
            programs = -(-n // bn) * sk
            if steps % sk == 0 and programs <= 16 * sms and programs / (-(-programs // sms) * sms) >= 0.9:
                out.append(qgemv_mod.config(bn, bk, sk, False, warps, 1, ticket=True, variant=4, maxnreg=regs))
    return out


def launch_i8_alone(cfg, x, q, s, z, group, out, asm, pre) -> None:
    """kernels.qgemv_i8's GEMV with x's int8 rounding ``pre`` computed beforehand: its kernel (and split-K reduce)."""
    qgemv_i8.launch_i8(cfg, x, q, s, z, group, None, out, False, asm, rounded=pre)


def probe_shape(name: str, k: int, n: int, m: int, bits: int, group: int, sms: int) -> list[dict]:
    """One row per variant for one projection at M = m."""
    x, q, s, z = packed_operands(m, k, n, bits, group)
    packed_bytes = q.nbytes + s.nbytes + z.nbytes
    w = dequant_ref(q, s, z, bits)
    ref = x.float() @ w.T
    dense = w.to(torch.bfloat16)
    del w
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    gemv = m <= 64
    if gemv:
        block_m = 1 if m == 1 else max(16, 1 << (m - 1).bit_length())
        cands = qgemv_mod._candidates(block_m, n, k, sms, group, bits, int8_x=m <= qgemv_mod.qgemv_i8.MAX_M)
        run = functools.partial(qgemv_mod._launch, x=x, q=q, s=s, z=z, bits=bits, group=group, bias=None,
                                out=out, block_m=block_m)
    else:
        cands = qgemm_mod._configs(group, bits)
        run = functools.partial(qgemm_mod._launch, x=x, q=q, s=s, z=z, bits=bits, group=group, bias=None, out=out)
    found = time_candidates(cands, run, ref, out, fits_l2(packed_bytes, x.device), gemv and m == 1)
    i8 = [c for c in cands if c.kwargs.get("VARIANT") == 4] if gemv and m == 1 else []
    if i8:  # the int8-x GEMV's kernel alone, x rounded beforehand (the norm's program does it for qkv and gate_up)
        pre = quantize_x(x)
        asm = torch.version.hip is None
        alone = functools.partial(launch_i8_alone, x=x, q=q, s=s, z=z, group=group, out=out, asm=asm, pre=pre)
        found |= {"i8x-alone": v for v in time_candidates(i8, alone, ref, out, fits_l2(packed_bytes, x.device),
                                                            m == 1).values()}
        if bal := balanced_i8(n, k, sms):
            found |= {"i8x-bal": v for v in time_candidates(bal, alone, ref, out, fits_l2(packed_bytes, x.device),
                                                            m == 1).values()}
    peer_us = graph_ms(lambda: F.linear(x, dense), cold=fits_l2(dense.nbytes, x.device)) * 1e3
    copy = copy_gbps(packed_bytes, x.device) if gemv else None
    rows = []
    for variant, r in found.items():
        row = {"kernel": "qgemv" if gemv else "qgemm", "proj": name, "M": m, "K": k, "N": n, "variant": variant,
               "timed": r["timed"], "failed": r["failed"], "max_rel_err": r["err"], "peer_bf16_us": peer_us,
               "errors": r.get("errors", []), "bad": r.get("bad", [])}
        if r["best"] is not None:
            us, cfg = r["best"]
            row.update(us=us, config=cfg, x_bf16=peer_us / us)
            if gemv:
                gbps = packed_bytes / us / 1e3
                row.update(packed_GBps=gbps, copy_GBps=copy, of_copy=gbps / copy)
            else:
                row.update(TFLOPs=2.0 * m * n * k / us / 1e6)
        rows.append(row)
    return rows


def probe_ggml(name: str, k: int, n: int, m: int, qtype: str) -> dict:
    """One row: kernels/ggml_gemv.py on random ``qtype`` blocks (std 0.02) at M = m, bf16 x."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    blocks = random_blocks(GGMLQuantizationType[qtype.upper()], n * k // 256, 0.02, gen).view(n, -1)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = ggml_blocks.dequant_ref(blocks, qtype, k)
    ref, dense = x.float() @ w.T, w.to(torch.bfloat16)
    del w
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    ggml_gemv(x, blocks, qtype, out=out)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    us = graph_ms(lambda: ggml_gemv(x, blocks, qtype, out=out), cold=fits_l2(blocks.nbytes, x.device)) * 1e3
    peer_us = graph_ms(lambda: F.linear(x, dense), cold=fits_l2(dense.nbytes, x.device)) * 1e3
    gbps, copy = blocks.nbytes / us / 1e3, copy_gbps(blocks.nbytes, x.device)
    return {"kernel": "ggml", "proj": name, "M": m, "K": k, "N": n, "variant": qtype, "timed": 1, "failed": 0,
            "max_rel_err": err, "peer_bf16_us": peer_us, "errors": [], "us": us, "config": "fixed",
            "x_bf16": peer_us / us, "packed_GBps": gbps, "copy_GBps": copy, "of_copy": gbps / copy}


def table(rows: list[dict]) -> str:
    head = f"{'kernel':6} {'proj':8} {'M':>5} {'variant':11} {'us':>8} {'x bf16':>7} {'GB/s':>7} {'of copy':>7} " \
           f"{'err':>8}  best config"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "us" not in r:
            lines.append(f"{r['kernel']:6} {r['proj']:8} {r['M']:>5} {r['variant']:11} no candidate ran: {r['errors']}")
            continue
        gb = f"{r['packed_GBps']:7.0f} {100 * r['of_copy']:6.0f}%" if "packed_GBps" in r else f"{'':7} {'':7}"
        lines.append(f"{r['kernel']:6} {r['proj']:8} {r['M']:>5} {r['variant']:11} {r['us']:8.1f} {r['x_bf16']:7.2f} "
                     f"{gb} {r['max_rel_err']:8.1e}  {r['config']}")
        lines += [f"{'':6} {'':8} {'':>5} {'':11} wrong: {bad}" for bad in r.get("bad", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/probe_qkernels.py times Triton kernels and needs a CUDA GPU; none is visible "
              "(run it on the GPU machine)", file=sys.stderr)
        return 2
    if args.ggml_sweep:
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "ggml_sweep": run_sweep(args.sweep_qtypes, args.sweep_batches, args.budget_s, args.sweep_caps)}
        print(f"device: {res['device']} | torch {res['torch']} | triton {res['triton']} | ggml_gemv sweep "
              f"{res['ggml_sweep']['seconds']:.0f} s")
        print(sweep_table(res["ggml_sweep"]))
        return write_json(res, args.out)
    t0 = time.perf_counter()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    known = {n: (k, nn) for n, k, nn in QWEN7B_QUANT}
    rows = []
    for m in args.batches:
        for name in args.shapes:
            rows += probe_shape(name, *known[name], m, args.bits, args.group, sms)
            rows += [probe_ggml(name, *known[name], m, qtype) for qtype in args.ggml if m <= 64]
            print(f"[{time.perf_counter() - t0:6.1f} s] {name} M={m} done", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "bits": args.bits, "group": args.group, "seconds": time.perf_counter() - t0, "rows": rows}
    print(f"device: {res['device']} | torch {res['torch']} | triton {res['triton']} | int{args.bits} g{args.group} "
          f"| {res['seconds']:.0f} s")
    print(table(rows))
    return write_json(res, args.out)


def write_json(res: dict, path: str) -> int:
    """Write ``res`` to ``path`` atomically (a temporary file renamed); returns the exit status 0."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
