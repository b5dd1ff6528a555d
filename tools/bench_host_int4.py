"""Microbenchmark of a host layer's int4 linear on this CPU: the dequantizing path against torch's
CPU int4 kernel (``engine.host_int4``).

For each shape (N, K) and batch it times, on random AWQ-style int4 weights (asymmetric, group G):
``dequant``, what a host layer did before (``dequantize`` to fp32, cast to the activation dtype,
``F.linear``), ``int4``, ``engine.host_int4.int4_linear`` (torch's int4 kernel), and for
scale ``dense``, ``F.linear`` on the weight already dequantized to the activation dtype (what an
unquantized layer of the same shape costs: 4x the bytes in bf16). It prints the median
and best milliseconds of each, and the packed weight's GB/s of the two int4 paths at the median.
The first call of each path is a warm-up.

    python -m tools.bench_host_int4 --shapes 4608x3584,3584x18944 --batches 1,4 --group 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from engine.host_int4 import int4_linear, random_int4, to_cpu_int4
from engine.quant.spec import dequantize


def times_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, best) milliseconds of ``repeats`` calls after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def _pairs(text: str, sep: str) -> list[tuple[int, ...]]:
    try:
        return [tuple(int(v) for v in item.split(sep)) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list like 4608{sep}3584, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4608x3584,3584x18944", type=lambda t: _pairs(t, "x"),
                   help="comma list of NxK weight shapes (out x in features)")
    p.add_argument("--batches", default="1,4", type=lambda t: [b for (b,) in _pairs(t, "x")])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="activations, and the dtype the int4 kernel runs in (the host lane picks bf16 for fp16)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {args.dtype}, "
          f"group {args.group}")
    for n, k in args.shapes:
        if k % args.group:
            print(f"error: group {args.group} does not divide K={k}", file=sys.stderr)
            return 2
        w = random_int4(n, k, args.group)
        c = to_cpu_int4(w, dtype)
        if c is None:
            print(f"error: the CPU int4 kernel does not take a [{n}, {k}] weight at group {args.group} "
                  "(N must be a multiple of 16)", file=sys.stderr)
            return 2
        for b in args.batches:
            x = torch.randn(b, k).to(dtype)
            old = times_ms(lambda: F.linear(x, dequantize(w).to(dtype)), args.repeats)
            new = times_ms(lambda: int4_linear(x, c), args.repeats)
            dense_w = dequantize(w).to(dtype)
            dense = times_ms(lambda: F.linear(x, dense_w), args.repeats)
            gb = w.nbytes / 1e9
            print(f"N={n} K={k} batch {b}: dequant {old[0]:.2f} ms (best {old[1]:.2f}, {gb / old[0] * 1e3:.2f} GB/s)"
                  f"  int4 {new[0]:.2f} ms (best {new[1]:.2f}, {gb / new[0] * 1e3:.2f} GB/s)  "
                  f"{old[0] / new[0]:.1f}x faster  dense {args.dtype} {dense[0]:.2f} ms (best {dense[1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
