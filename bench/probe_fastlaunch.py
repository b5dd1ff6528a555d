"""Host time a launch, kernels.fastlaunch's direct path against Triton's own, alone and beside a Python thread that
wants the GIL (a server's event loop), for two kernels: swiglu (3 arguments) and the TMA GEMM (descriptors, 11
arguments). Prints microseconds a launch, median of 5 rounds of 2,000 launches each way, alternated.

    python bench/probe_fastlaunch.py [--rounds 5] [--launches 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import fastlaunch, gemm  # noqa: E402
from kernels.swiglu import swiglu  # noqa: E402


def _busy(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(1000):
            x += 1


def _round(fn, n: int, direct: bool) -> float:
    fastlaunch._ENABLED = direct
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--launches", type=int, default=2000)
    a = p.parse_args()
    gu = torch.randn(16, 2 * 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(128, 3584, device="cuda", dtype=torch.bfloat16)  # a shape with a shipped pick: nothing tuned
    w = torch.randn(3584, 3584, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(128, 3584, device="cuda", dtype=torch.bfloat16)
    cases = {"swiglu": lambda: swiglu(gu), "gemm": lambda: gemm.gemm(x, w, out=out)}
    for f in cases.values():  # compile, tune, keep each path's first launch
        for direct in (False, True, True):
            _round(f, 3, direct)
    for contended in (False, True):
        stop = threading.Event()
        t = threading.Thread(target=_busy, args=(stop,), daemon=True)
        if contended:
            t.start()
        for name, f in cases.items():
            res = {True: [], False: []}
            for _ in range(a.rounds):
                for direct in (False, True):
                    res[direct].append(_round(f, a.launches, direct))
            tri, dire = statistics.median(res[False]), statistics.median(res[True])
            print(f"{name:7s} {'beside a busy thread' if contended else 'alone':21s} Triton {tri:7.1f} us  "
                  f"direct {dire:7.1f} us  ({dire / tri:.2f}x)", flush=True)
        stop.set()
    print("launches each way:", fastlaunch.STATS)


if __name__ == "__main__":
    main()
