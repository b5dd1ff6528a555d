"""Probe: does the prefill GEMM tuner's timer rank configs the way rotating weights do?

For the Qwen2.5-7B qkv and o projections at 2048 tokens, every candidate config is timed
three ways: ``bench_ms`` (the tuner's timer: eager, operands warm in the L2), ``graph_ms`` cold
(after an L2-sized read) and CUDA-graph replays rotating over 4 weight copies (how
tools/bench_kernels.py times). Then three fresh tunings with the tuner as committed.
Writes $OUT/probe_gemm_pick.json.  Usage on the GPU machine: python bench/probe_gemm_pick.py
"""
from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from bench.probe_decode import graph_time  # noqa: E402
from kernels import gemm as gm  # noqa: E402
from kernels import gemm_tma  # noqa: E402
from kernels.tuning import bench_ms, graph_ms  # noqa: E402


def _cfg_name(c) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f", w{c.num_warps} s{c.num_stages}"


def shape(M: int, K: int, N: int) -> dict:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for _ in range(4)]
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    cands = gm._candidates(x, gemm_tma.eligible(x, ws[0], out))
    rows = []
    for c in cands:
        try:
            hot = bench_ms(lambda: gm._launch(c, x, ws[0], None, out))
            cold = graph_ms(lambda: gm._launch(c, x, ws[0], None, out), cold=True)
            rot = graph_time([lambda w=w: gm._launch(c, x, w, None, out) for w in ws])
        except Exception as e:  # noqa: BLE001 - a config this GPU cannot run
            rows.append({"config": _cfg_name(c), "error": type(e).__name__})
            continue
        rows.append({"config": _cfg_name(c), "hot_us": hot * 1e3, "cold_us": cold * 1e3, "rotating_us": rot * 1e3})
    cublas = graph_time([lambda w=w: torch.matmul(x, w.T) for w in ws]) * 1e3
    picks = []
    for _ in range(3):
        gm._TUNED.clear()
        gm.gemm(x, ws[0])
        c = list(gm._TUNED.values())[0]
        picks.append([_cfg_name(c), graph_time([lambda w=w: gm._launch(c, x, w, None, out) for w in ws]) * 1e3])
    ok = [r for r in rows if "error" not in r]
    best = {k: min(ok, key=lambda r: r[k]) for k in ("hot_us", "cold_us", "rotating_us")}
    return {"cublas_rotating_us": cublas, "rows": rows, "picks": picks,
            "best_by": {k: [v["config"], v["rotating_us"]] for k, v in best.items()}}


def main() -> int:
    out_dir = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, K, N in (("qkv", 3584, 4608), ("o", 3584, 3584)):
        res[name] = shape(2048, K, N)
        r = res[name]
        print(f"{name}: cublas {r['cublas_rotating_us']:.1f} us; picks (rotating us): "
              f"{[round(p[1], 1) for p in r['picks']]}; best by hot/cold/rotating timer -> rotating us "
              f"{[round(v[1], 1) for v in r['best_by'].values()]}", flush=True)
    with open(os.path.join(out_dir, "probe_gemm_pick.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
