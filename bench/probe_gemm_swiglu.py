"""GPU probe: the fused gate_up + SwiGLU GEMM (kernels/gemm_swiglu.py) against gemm + swiglu at the 7B's
MLP shape (K 3584, 2I 37888), bf16: the engine's path, and every halved candidate config timed alone.

    python bench/probe_gemm_swiglu.py --out probe.json
"""
from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from kernels import gemm as gemm_mod
from kernels.gemm_swiglu import _gemm_swiglu, _halved, gemm_swiglu
from kernels.swiglu import swiglu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1024,2048,4096")
    p.add_argument("--out")
    a = p.parse_args()
    K, N2 = 3584, 37888
    w = torch.randn(N2, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
    rows = []
    for M in map(int, a.m.split(",")):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        unfused = triton.testing.do_bench(lambda: swiglu(gemm_mod.gemm(x, w)), rep=200)
        gemm_only = triton.testing.do_bench(lambda: gemm_mod.gemm(x, w), rep=200)
        fused = triton.testing.do_bench(lambda: gemm_swiglu(x, w), rep=200)
        per = []
        for c in gemm_mod._candidates(x, True):
            h = _halved(c)
            try:
                t = triton.testing.do_bench(lambda: _gemm_swiglu(x, w, h), rep=100)
            except Exception as e:  # noqa: BLE001
                t = None
                print("  failed", h, type(e).__name__)
            per.append((str(h), t))
        best = min((t for _, t in per if t), default=None)
        row = dict(M=M, unfused_ms=unfused, gemm_only_ms=gemm_only, fused_engine_ms=fused, fused_best_ms=best,
                   candidates=per)
        rows.append(row)
        print(f"M={M}: gemm+swiglu {unfused:.3f} ms (gemm {gemm_only:.3f}), fused engine pick {fused:.3f} ms, "
              f"fused best candidate {best:.3f} ms")
        for s, t in per:
            print(f"    {t if t is None else round(t, 3)}  {s}")
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
