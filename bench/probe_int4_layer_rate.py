"""Probe: does the host lane's int4 rate (engine.host_int4.measure_int4_gemv: one ~128 MB matrix, K = 4096)
stand for a real layer's four projections? Issue 18: on the H200 host the planner planned the synthetic 7B
AWQ's host layers at 39.5 GB/s and the lane achieved 24.8 (bench/results/2026-12-05-h200-s37/call1/).

Prints the micro-benchmark's GB/s, then the 7B's qkv, o, gate_up and down (int4 g128) timed back to back
as one layer and each alone, batch 1, in --dtype activations (torch's CPU int4 kernel, this machine's threads).

    PYTHONPATH=. python bench/probe_int4_layer_rate.py [--dtype bf16] [--repeats 5]
"""
from __future__ import annotations

import argparse

import torch

from engine.host_int4 import int4_linear, kernel_dtype, measure_int4_gemv, random_int4, to_cpu_int4
from tools.bench_host_int4 import times_ms

SHAPES = [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)]


def _median_s(fn, repeats: int) -> float:
    return times_ms(fn, repeats)[0] / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype} activations, batch 1")
    print(f"micro-benchmark (memory.host_rate's int4 rate): {measure_int4_gemv(1, dt, repeats=a.repeats):.2f} GB/s")
    weights = []
    for name, n, k in SHAPES:
        w = to_cpu_int4(random_int4(n, k, 128), kernel_dtype(dt))
        weights.append((name, w, torch.randn(1, k).to(dt), n * (k // 2 + 4 * (k // 128))))
    total = sum(b for *_, b in weights)
    layer_s = _median_s(lambda: [int4_linear(x, w) for _, w, x, _ in weights], a.repeats)
    print(f"the 7B's layer, four projections back to back: {total / layer_s / 1e9:.2f} GB/s ({layer_s * 1e3:.2f} ms)")
    for name, w, x, nbytes in weights:
        s = _median_s(lambda w=w, x=x: int4_linear(x, w), a.repeats)
        print(f"  {name:8} {nbytes / s / 1e9:6.2f} GB/s ({s * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()
