"""Would programmatic dependent launch (PDL) shorten a decode step? A chain shaped like the 7B AWQ's batch-1 decode
step, timed as one CUDA graph with and without PDL, alternated.

Issue 15's decode is 2.9 ms a step against 2.60 ms of kernels (322 launches, session 23): ~1 us between two
dependent kernels, and each GEMV's ramp and tail leave SMs idle. With PDL (Hopper: Triton's ``launch_pdl=True``
and ``gdc_wait`` / ``gdc_launch_dependents``) a kernel's programs start while the one before drains. The chain: 28
layers of a norm-sized small kernel, then four GEMVs reading bf16 weights of the packed int4 projections' bytes (qkv
8.3 MB, o 6.4, gate_up 67.9, down 33.9 MB: a GEMV over the same bytes), each reading one value its predecessor wrote,
so the order is real. Two modes: plain; ``wait``: PDL, every program waits before its first load. Prints ms a step
(median of the rounds) and GB/s over the weights' bytes, beside a copy of the same bytes.

    python bench/probe_pdl.py [--rounds 7] [--layers 28]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

K = 3584
SHAPES = {"qkv": 8_257_536, "o": 6_422_528, "gate_up": 67_895_296, "down": 33_947_648}  # packed int4 bytes


@triton.jit
def _gemv(w_ptr, x_ptr, prev_ptr, out_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          MODE: tl.constexpr):
    """out[n] = w[n, :] @ x + prev[0] * 0 (prev: the predecessor's output: a real dependency)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :]
    mask = rows[:, None] < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if MODE > 0:
        gdc_wait()
        gdc_launch_dependents()
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=mask, other=0.0)
        acc += w.to(tl.float32) * tl.load(x_ptr + k0 + cols)[None, :].to(tl.float32)
    dep = tl.load(prev_ptr).to(tl.float32)
    tl.store(out_ptr + rows, (tl.sum(acc, axis=1) + dep * 0.0).to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _small(prev_ptr, x_ptr, out_ptr, K: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """A norm-sized kernel: out = x * 1 + prev[0] * 0 over K values, one program."""
    if MODE > 0:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, BLOCK)
    m = offs < K
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) + tl.load(prev_ptr).to(tl.float32) * 0.0
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=m)


def _chain(weights, x, outs, mode: int, layers: int):
    pdl = {"launch_pdl": True} if mode else {}
    prev = outs[-1]
    for _ in range(layers):
        _small[(1,)](prev, x, outs[0], K, 4096, mode, **pdl)
        prev = outs[0]
        for i, w in enumerate(weights):
            n = w.shape[0]
            _gemv[(triton.cdiv(n, 16),)](w, x, prev, outs[i + 1], n, K, 16, 256, mode, num_warps=4, num_stages=3,
                                        **pdl)
            prev = outs[i + 1]


def _graph(fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _ms(g: torch.cuda.CUDAGraph, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--layers", type=int, default=28)
    args = ap.parse_args()
    torch.manual_seed(0)
    # every layer its own weights (no L2 reuse across layers, as in a step)
    per_layer = [[torch.randn(b // (2 * K), K, device="cuda", dtype=torch.bfloat16) for b in SHAPES.values()]
                 for _ in range(args.layers)]
    x = torch.randn(K, device="cuda", dtype=torch.bfloat16)
    rows = max(max(b // (2 * K) for b in SHAPES.values()), K)
    outs = [torch.zeros(rows, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    nbytes = sum(SHAPES.values()) * args.layers

    def run(mode):
        def fn():
            for ws in per_layer:
                _chain(ws, x, outs, mode, 1)
        return fn

    names = {0: "plain", 1: "wait"}
    graphs = {m: _graph(run(m)) for m in names}
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = _graph(lambda: dst.copy_(src))
    times: dict[str, list[float]] = {n: [] for n in [*names.values(), "copy"]}
    for _ in range(args.rounds):
        for m, name in names.items():
            times[name].append(_ms(graphs[m]))
        times["copy"].append(_ms(copy))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{args.layers} layers, {5 * args.layers} launches, {nbytes / 1e9:.2f} GB of weights a step")
    for name, ts in times.items():
        ms = statistics.median(ts)
        rate = nbytes / ms / 1e6 * (2 if name == "copy" else 1)  # a copy reads and writes the bytes
        print(f"  {name:9s} {ms:7.3f} ms a step  ({min(ts):.3f}-{max(ts):.3f})  {rate:7.0f} GB/s"
              + (" read + written" if name == "copy" else " of weights read"))
    print(f"  wait / plain: {statistics.median(times['wait']) / statistics.median(times['plain']):.3f}")


if __name__ == "__main__":
    main()
