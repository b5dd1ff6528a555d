"""Launch-config sweep of kernels/ggml_gemv.py (bench/probe_qkernels.py --ggml-sweep; CUDA only).

Per case (qtype, M, GGUF tensor shape; bf16 x, random blocks of std 0.02) every candidate BLOCK_N x
num_warps (x SPLIT_K where the unsplit grid leaves the SMs short of programs) is compiled (in
parallel: kernels.tuning.precompile), checked against fp32 ``x @ dequant_ref(blocks).T`` (relative
Frobenius error under 1e-2, the bf16 matmul tolerance of the tests) and timed as the probe's other
rows (kernels.tuning.graph_ms, cold where the blocks fit twice the L2), next to the fixed launch
(config None).  Rates are on the block bytes, with their fraction of a device-to-device copy of the
same number of bytes (read + write counted).  A time budget bounds the sweep; cases it leaves are
listed as skipped.
"""
from __future__ import annotations

import time
import torch
from gguf import GGMLQuantizationType

from engine.gguf.random_blocks import random_blocks
from kernels import ggml_blocks
from kernels.ggml_gemv import ggml_gemv
from kernels.tuning import fits_l2, graph_ms, precompile

SWEEP_QTYPES = ("q4_k", "q6_k", "q5_0", "q8_0")
# Qwen2.5-7B's GGUF tensors (name, K, N): q and o, k and v, gate and up, down; the legacy types also
# Qwen2.5-72B's ffn_down (K 29568 = 924 blocks of 32, not a multiple of 256), Q5_0 / Q8_0 in Q4_K_M files
SWEEP_SHAPES = [("q_o", 3584, 3584), ("k_v", 3584, 512), ("gate_up", 3584, 18944), ("down", 18944, 3584)]
LEGACY_SHAPES = [("down72b", 29568, 8192)]
BLOCK_NS, WARPS, SPLITS = (8, 16, 32, 64), (2, 4, 8), (2, 4, 8)
MAX_REL_ERR = 1e-2


def copy_gbps(nbytes: int, device: torch.device) -> float:
    """Device-to-device copy rate of ``nbytes`` (read + write counted), timed as the kernels are."""
    src = torch.empty(nbytes, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_us = graph_ms(lambda: dst.copy_(src), cold=fits_l2(2 * nbytes, device)) * 1e3
    return 2 * nbytes / copy_us / 1e3


def candidates(qtype: str, m: int, k: int, n: int, sms: int, caps: tuple[int, ...] = ()) -> list[dict[str, int]]:
    """BLOCK_N x num_warps, plus SPLIT_K 2 / 4 / 8 while the grid one split level lower has fewer
    than 4 programs an SM (and each split keeps at least 2 steps of the row); at M = 1 (the FMA path) each
    also with every register cap in ``caps`` (kernels.ggml_gemv.check_config's maxnreg: under Triton 3.6 the
    default Q4_K / Q6_K / Q4_1 launches issue 16-30 of a step's loads after its first FMA, none with a cap of
    64-96; bench/results/2026-12-05-cpu-sass-ggml/)."""
    steps = -(-k // 256)  # K-quant super-blocks, or legacy steps of 8 blocks of 32
    out = []
    for block_n in BLOCK_NS:
        programs = -(-n // block_n)  # bf16 x: one program a tile for all M rows (dot) or the one row (FMA)
        for warps in WARPS:
            out.append({"BLOCK_N": block_n, "num_warps": warps})
            out += [{"BLOCK_N": block_n, "num_warps": warps, "SPLIT_K": s} for s in SPLITS
                    if programs * s // 2 < 4 * sms and steps >= 2 * s]
    if m == 1:
        out += [{**c, "maxnreg": cap} for cap in caps for c in out]
    return out


def cfg_str(cfg: dict[str, int] | None) -> str:
    if cfg is None:
        return "fixed"
    return (f"BN{cfg['BLOCK_N']} w{cfg['num_warps']}" + (f" sk{cfg['SPLIT_K']}" if "SPLIT_K" in cfg else "")
            + (f" r{cfg['maxnreg']}" if "maxnreg" in cfg else ""))


def sweep_case(qtype: str, proj: str, k: int, n: int, m: int, sms: int, deadline: float,
               device: str = "cuda", caps: tuple[int, ...] = ()) -> dict:
    """Time every candidate of one case (stopping at ``deadline``, a perf_counter time)."""
    gen = torch.Generator(device=device).manual_seed(m)
    blocks = random_blocks(GGMLQuantizationType[qtype.upper()], n * k // ggml_blocks.BLOCKS[qtype][0], 0.02,
                           gen).view(n, -1)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    ref = x.float() @ ggml_blocks.dequant_ref(blocks, qtype, k).T
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    cold = fits_l2(blocks.nbytes, x.device)
    cands: list[dict | None] = [None, *candidates(qtype, m, k, n, sms, caps)]

    def run(cfg: dict | None) -> None:
        ggml_gemv(x, blocks, qtype, out=out, config={} if cfg is None else cfg)

    precompile(cands, run, x.device)
    timed, failed = [], []
    for cfg in cands:
        if time.perf_counter() > deadline:
            failed.append(f"{cfg_str(cfg)}: not timed (budget spent)")
            continue
        try:
            out.fill_(float("nan"))
            run(cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if not err < MAX_REL_ERR:
                failed.append(f"{cfg_str(cfg)}: rel err {err:.2e}")
                continue
            timed.append((graph_ms(lambda c=cfg: run(c), cold=cold) * 1e3, cfg, err))
        except Exception as e:  # noqa: BLE001 - a config this GPU cannot compile or run: report it
            failed.append(f"{cfg_str(cfg)}: {type(e).__name__}: {str(e)[:120]}")
    copy = copy_gbps(blocks.nbytes, x.device)
    return summarize(qtype, proj, k, n, m, blocks.nbytes, copy, timed, failed)


def summarize(qtype: str, proj: str, k: int, n: int, m: int, nbytes: int, copy: float,
              timed: list[tuple[float, dict | None, float]], failed: list[str]) -> dict:
    """One JSON row: the fixed launch's and the best candidate's time and rates, every time taken."""
    row = {"qtype": qtype, "proj": proj, "M": m, "K": k, "N": n, "block_bytes": nbytes, "copy_GBps": copy,
           "timed": len(timed), "failed": failed,
           "all_us": {cfg_str(c): round(us, 3) for us, c, _ in timed}}
    rate = {}
    for label, pick in (("fixed", [t for t in timed if t[1] is None]),
                        ("best", sorted((t for t in timed if t[1] is not None), key=lambda t: t[0])[:1])):
        if pick:
            us, cfg, err = pick[0]
            gbps = nbytes / us / 1e3
            rate[label] = {"config": cfg, "us": us, "GBps": gbps, "of_copy": gbps / copy, "rel_err": err}
    return {**row, **rate}


def run_sweep(qtypes: list[str], batches: list[int], budget_s: float, caps: tuple[int, ...] = ()) -> dict:
    """Every case in order M, qtype, shape until ``budget_s`` seconds are spent (at M = 1 also with the
    register ``caps``); returns rows, the best config per (qtype, M, N, K) and the skipped cases."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    rows, skipped = [], []
    for m in batches:
        for qtype in qtypes:
            shapes = SWEEP_SHAPES + (LEGACY_SHAPES if qtype in ggml_blocks.LEGACY else [])
            for proj, k, n in shapes:
                if time.perf_counter() > deadline:
                    skipped.append(f"{qtype} {proj} M={m}")
                    continue
                rows.append(sweep_case(qtype, proj, k, n, m, sms, deadline, caps=caps))
                torch.cuda.empty_cache()
                print(f"[{time.perf_counter() - t0:6.1f} s] ggml sweep {qtype} {proj} M={m}: "
                      f"{rows[-1]['timed']} timed, {len(rows[-1]['failed'])} failed", flush=True)
    best = {f"{r['qtype']}/M{r['M']}/N{r['N']}/K{r['K']}": r["best"]["config"] for r in rows if "best" in r}
    return {"budget_s": budget_s, "seconds": time.perf_counter() - t0, "rows": rows, "best": best,
            "skipped": skipped}


def sweep_table(res: dict) -> str:
    """A short text table: per case the fixed launch and the best candidate."""
    head = f"{'qtype':5} {'proj':8} {'M':>3} {'N':>6} {'K':>6} {'fixed us':>9} {'best us':>8} {'GB/s':>6} " \
           f"{'of copy':>7} {'fail':>4}  best config"
    lines = [head, "-" * len(head)]
    for r in res["rows"]:
        fixed = f"{r['fixed']['us']:9.1f}" if "fixed" in r else f"{'-':>9}"
        if "best" not in r:
            lines.append(f"{r['qtype']:5} {r['proj']:8} {r['M']:>3} {r['N']:>6} {r['K']:>6} {fixed} no candidate "
                         f"passed: {r['failed'][:3]}")
            continue
        b = r["best"]
        lines.append(f"{r['qtype']:5} {r['proj']:8} {r['M']:>3} {r['N']:>6} {r['K']:>6} {fixed} {b['us']:8.1f} "
                     f"{b['GBps']:6.0f} {100 * b['of_copy']:6.0f}% {len(r['failed']):>4}  {cfg_str(b['config'])}")
    fails = [f"{r['qtype']} {r['proj']} M={r['M']}: {'; '.join(r['failed'][:4])}" for r in res["rows"] if r["failed"]]
    lines += [f"failed: {f}" for f in fails]
    if res["skipped"]:
        lines.append(f"budget {res['budget_s']:.0f} s spent; skipped {len(res['skipped'])} cases: "
                     + ", ".join(res["skipped"]))
    return "\n".join(lines)
