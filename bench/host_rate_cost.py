"""What a first run's host-rate measurements cost on this machine, before and after session 39's change: the
dense GEMV rate on a 256 MiB random bf16 weight (as measured before) against memory.host_rate.measure_host_gemv
(a patterned weight past the last-level cache), and the int4 rate on a whole random weight converted for torch's
CPU kernel against engine.host_int4.measure_int4_gemv (one converted block repeated). Seconds and GB/s of each.

    python bench/host_rate_cost.py
"""

from __future__ import annotations

import platform
import time

import torch

from engine.host_int4 import (N_MULTIPLE, int4_linear, kernel_dtype, measure_int4_gemv, random_int4,
                              to_cpu_int4)
from memory.host_rate import gemv_gbps, last_level_cache_bytes, measure_host_gemv


def old_dense(nbytes: int = 256 << 20, hidden: int = 4096) -> float:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn((nbytes // (hidden * 2), hidden), generator=gen).to(torch.bfloat16)
    return gemv_gbps(w, torch.randn((1, hidden), generator=gen).to(torch.bfloat16), 5)


def old_int4(nbytes: int = 128 << 20, hidden: int = 4096, group: int = 128) -> float:
    per_row = hidden // 2 + 4 * (hidden // group)
    rows = nbytes // per_row // N_MULTIPLE * N_MULTIPLE
    w = to_cpu_int4(random_int4(rows, hidden, group), kernel_dtype(torch.bfloat16))
    x = torch.randn(1, hidden).to(torch.bfloat16)
    int4_linear(x, w)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        int4_linear(x, w)
        t.append(time.perf_counter() - t0)
    return rows * per_row / sorted(t)[2] / 1e9


def main() -> None:
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, last-level cache {last_level_cache_bytes() >> 20} MiB")
    for name, fn in (("dense, before (256 MiB random)", old_dense), ("dense, now", lambda: measure_host_gemv(1, torch.bfloat16)),
                     ("int4, before (128 MiB random, converted whole)", old_int4),
                     ("int4, now", lambda: measure_int4_gemv(1, torch.bfloat16))):
        t0 = time.perf_counter()
        gbps = fn()
        print(f"{name:48s} {time.perf_counter() - t0:5.2f} s  {gbps:6.1f} GB/s")


if __name__ == "__main__":
    main()
