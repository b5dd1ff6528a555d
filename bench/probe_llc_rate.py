"""Does the host GEMV rate measured on a weight smaller than the last-level cache read the cache? The lane's
dense GEMV rate (its pinned worker, batch 1, bf16) on weights of 128 MiB to 2 GiB, alternated, three rounds.

    python bench/probe_llc_rate.py
"""

from __future__ import annotations

import torch

from engine.host_worker import machine_pick, run_pinned
from memory.host_rate import last_level_cache_bytes, measure_host_gemv

SIZES_MIB = (128, 256, 600, 2048)


def main() -> None:
    pick = machine_pick(False)
    print(pick.describe(), f"| last-level cache {last_level_cache_bytes() >> 20} MiB")
    rows = {s: [] for s in SIZES_MIB}
    for _ in range(3):
        for s in SIZES_MIB:
            rows[s].append(run_pinned(pick, measure_host_gemv, 1, torch.bfloat16, s << 20))
    for s, r in rows.items():
        print(f"{s:5d} MiB: " + " ".join(f"{x:6.1f}" for x in r) + " GB/s")


if __name__ == "__main__":
    main()
