"""Is the served prompt pass's host speed a property of the CPU its thread runs on, or of what the copy engine does?

Session 29 found one server process's Python run every function ~1.8x slower in one 16-prompt pass than in another
on the same machine (bench/ab_serve.sh with LAYERSTREAM_PROFILE_PASSES: same call counts, no steal, no other busy
thread). This times one fixed host workload (torch tensor views and small CPU ops, the mix of a launch path's Python)
pinned to each CPU in turn, ``--rounds`` times, then again while a thread copies pinned host memory to the GPU
non-stop (the weight stream's traffic), then on the first CPU while one other process spins on each other CPU in
turn (a virtual machine's vCPUs may be the two hyperthreads of one physical core, which its "1 thread per core"
hides: a spinning sibling, such as an OpenMP worker waiting for work, would slow the engine's thread ~1.5-2x) and
while every other CPU spins. Prints ms per CPU per round; a CPU slow in every round is a slow core, a round slow on
every CPU is the machine, a slowdown only beside the copies is memory traffic, one only beside a given CPU's spinner
is a shared core.

Session 29's first run (H200 machine, 16 vCPUs): every CPU within 1.13x of the others idle, within 1.10x beside
54 GB/s of copies; neither explains a 1.8x slower pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch


def workload(n: int) -> float:
    """Seconds for ``n`` iterations of a launch-path-like mix of Python and small torch calls."""
    a = torch.empty(64, 64)
    t0 = time.perf_counter()
    for i in range(n):
        v = a.view(4096).view(64, 64)
        s = v.stride()
        d = {"M": i, "N": s[0], "K": v.shape[1], "ptr": v.data_ptr() % 16}
        key = tuple(sorted(d.items()))
        hash(key)
    return time.perf_counter() - t0


def sweep(cpus: list[int], rounds: int, n: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {c: [] for c in cpus}
    for _ in range(rounds):
        for c in cpus:
            os.sched_setaffinity(0, {c})
            workload(n // 10)
            out[c].append(workload(n) * 1e3)
    os.sched_setaffinity(0, set(cpus))
    return out


def copier(stop: threading.Event, stats: list[float]) -> None:
    src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    s = torch.cuda.Stream()
    moved, t0 = 0, time.perf_counter()
    with torch.cuda.stream(s):
        while not stop.is_set():
            dst.copy_(src, non_blocking=True)
            s.synchronize()
            moved += src.numel()
    stats.append(moved / (time.perf_counter() - t0) / 1e9)


SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def beside_spinners(me: int, others: list[list[int]], rounds: int, n: int) -> dict[str, list[float]]:
    """ms of the workload on CPU ``me`` while a bare interpreter spins on each CPU of each set of ``others``."""
    out: dict[str, list[float]] = {}
    os.sched_setaffinity(0, {me})
    for group in others:
        procs = [subprocess.Popen([sys.executable, "-S", "-c", SPIN, str(c)]) for c in group]
        time.sleep(0.3)
        workload(n // 10)
        out[",".join(map(str, group)) if len(group) < 4 else f"{len(group)} cpus"] = \
            [workload(n) * 1e3 for _ in range(rounds)]
        for p in procs:
            p.kill()
            p.wait()
    return out


def show(title: str, res: dict) -> None:
    print(title)
    for c, ms in res.items():
        print(f"  cpu {c!s:>2}: " + " ".join(f"{m:6.1f}" for m in ms) + f"   median {statistics.median(ms):6.1f} ms")
    meds = [statistics.median(v) for v in res.values()]
    print(f"  fastest {min(meds):.1f} ms, slowest {max(meds):.1f} ms ({max(meds) / min(meds):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=20000, help="iterations of the workload per timing")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    show("idle machine", sweep(cpus, args.rounds, args.n))
    if torch.cuda.is_available():
        stop, gbps = threading.Event(), []
        t = threading.Thread(target=copier, args=(stop, gbps), daemon=True)
        t.start()
        time.sleep(1.0)
        res = sweep(cpus, args.rounds, args.n)
        stop.set()
        t.join()
        show(f"beside pinned H2D copies ({gbps[0]:.1f} GB/s)", res)
    if len(cpus) > 1:
        me, rest = cpus[0], cpus[1:]
        show(f"on cpu {me} beside a process spinning on (a sibling hyperthread is ~1.5x or more)",
             beside_spinners(me, [[c] for c in rest] + [rest], args.rounds, args.n))


if __name__ == "__main__":
    main()
