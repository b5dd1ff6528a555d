"""Probe (issue 18): why a bf16 host layer ran 3.5x slower in the lane beside the streamer's copies than alone.

Session 38 on an H100 machine's host: the synthetic bf16 7B's host layers took 27.8 ms each in the lane at
batch 1 (17.2 GB/s), where one took 7.9 ms alone and the planner's GEMV, timed next to host-to-device copies,
read 44.8 GB/s; the AWQ lane on the same host, reading its own converted copies, came within 1.2x of its plan
(bench/results/2026-12-05-h100-s38/call4/). Not the memory bus: the copy engine was busy 49% of those host
layers' time, 40 GB/s read together (``tools.lane_trace --bus``). Suspects, timed here apart:

* the weights' memory: the bf16 lane reads the streamer's page-locked host buffers (plain memory registered
  with cudaHostRegister: streamer/pinning.py), the planner's GEMV reads plain memory;
* the thread: the lane computes on a worker thread (engine.host_worker), the probe that read 7.9 ms on the
  main thread;
* the copies' footprint: memory.host_rate.h2d_traffic copies one 128 MiB buffer over and over, which a large
  last-level cache may partly hold, where the streamer reads gigabytes of distinct layers from DRAM.

For each weight memory (``plain``; ``registered``: plain, then cudaHostRegister'd as the streamer does;
``pinned``: torch's pinned allocator) the 7B layer's four bf16 projections run back to back at --batch on a
worker set up as the lane's (engine.host_worker; plain memory also on this thread, as bench/probe_host_layer.py
timed it at 7.9 ms where the lane took 27.8), alone, next to copies out of one 128 MiB buffer and next
to copies cycling through --traffic-gib of distinct buffers. Prints ms and GB/s of weight bytes, the
transparent huge page setting and the process's AnonHugePages.

    PYTHONPATH=. python bench/probe_lane_memory.py [--batch 1] [--traffic-gib 2] [--repeats 5]
"""
from __future__ import annotations

import argparse
import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.host_worker import machine_pick, run_pinned
from tools.bench_host_int4 import times_ms

SHAPES = [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)]
CHUNK = 128 << 20


@contextlib.contextmanager
def traffic(total: int) -> Iterator[list[int]]:
    """A thread copying ``total`` bytes of distinct pinned buffers to the GPU, CHUNK at a time, round and round."""
    srcs = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True).fill_(1) for _ in range(max(1, total // CHUNK))]
    dst, stop, copies = torch.empty(CHUNK, dtype=torch.uint8, device="cuda"), threading.Event(), [0]

    def loop() -> None:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            while not stop.is_set():
                dst.copy_(srcs[copies[0] % len(srcs)], non_blocking=True)
                stream.synchronize()
                copies[0] += 1
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield copies
    finally:
        stop.set()
        t.join()


def weights(kind: str, registered: list[torch.Tensor]) -> list[torch.Tensor]:
    """The layer's projections in memory of ``kind``, filled with small values."""
    out = []
    for _, n, k in SHAPES:
        w = torch.empty(n, k, dtype=torch.bfloat16, pin_memory=kind == "pinned")
        w.uniform_(-0.02, 0.02)
        if kind == "registered":
            err = torch.cuda.cudart().cudaHostRegister(w.data_ptr(), w.numel() * w.element_size(), 1)
            assert int(err) == 0, f"cudaHostRegister failed: {err}"
            registered.append(w)
        out.append(w)
    return out


def anon_huge_mib() -> int:
    text = Path("/proc/self/smaps_rollup").read_text() if Path("/proc/self/smaps_rollup").exists() else ""
    m = re.search(r"AnonHugePages:\s+(\d+) kB", text)
    return int(m.group(1)) // 1024 if m else -1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--traffic-gib", type=float, default=2.0, help="distinct bytes the wide traffic cycles through")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/probe_lane_memory.py needs a CUDA device (page-locked memory, H2D copies)")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    pick = machine_pick(disk_tier=False)
    print(f"torch {torch.__version__}; THP {thp.read_text().strip() if thp.exists() else '?'}; {pick.describe()}")
    xs = {k: torch.randn(a.batch, k).to(torch.bfloat16) for _, _, k in SHAPES}  # by input size
    nbytes = sum(n * k * 2 for _, n, k in SHAPES)
    registered: list[torch.Tensor] = []
    for kind, on_worker in (("plain", True), ("plain", False), ("registered", True), ("pinned", True)):
        ws = weights(kind, registered)
        layer = lambda ws=ws: [F.linear(xs[w.shape[1]], w) for w in ws]  # noqa: E731
        timed = (lambda: run_pinned(pick, lambda: times_ms(layer, a.repeats)[0])) if on_worker else \
            (lambda: times_ms(layer, a.repeats)[0])  # this thread, torch's own thread count and CPUs
        row = []
        for name, ctx in (("alone", contextlib.nullcontext), ("128MiB copies", lambda: traffic(CHUNK)),
                          (f"{a.traffic_gib:g}GiB copies", lambda: traffic(int(a.traffic_gib * 2**30)))):
            with ctx() as copies:
                ms = timed()
            extra = f", {copies[0]} copies" if copies else ""
            row.append(f"{name} {ms:.2f} ms ({nbytes / ms / 1e6:.1f} GB/s{extra})")
        where = "worker" if on_worker else f"main thread, {torch.get_num_threads()} threads"
        print(f"{kind:10} ({where}) batch {a.batch}: " + "; ".join(row) + f" | AnonHugePages {anon_huge_mib()} MiB")
        del ws
    for w in registered:
        torch.cuda.cudart().cudaHostUnregister(w.data_ptr())


if __name__ == "__main__":
    main()
