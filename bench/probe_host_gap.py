"""Does a host layer run slower after the worker has idled (issue 18)? In a decode step the host lane's worker
waits while the GPU computes streamed layers (~8 ms each on the H200), so each run of host layers may start with
torch's OpenMP threads asleep or the caches cold. This times one decode step of a host layer on a worker thread
back to back and after idle gaps, plainly and with the worker keeping its OpenMP team busy while it waits.

    PYTHONPATH=. python bench/probe_host_gap.py [--width 3584|1024] [--threads 2] [--repeats 30]

Prints the median and best milliseconds per gap (0, 2, 8, 30 ms) for each mode. --width 1024 is a narrower
layer (intermediate 4096) whose fixed costs weigh more, as they would beside a 16-core host's faster GEMVs.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time

import torch

import bench.probe_host_layer as probe
from engine.config import ModelConfig
from engine.host_extra import decode_layer
from engine.host_lane import HostOps

GAPS_S = (0.0, 0.002, 0.008, 0.03)


def _layer(width: int, context: int):
    """A callable running one decode step of one bf16 host layer through HostOps."""
    d = dict(probe.QWEN7B)
    if width != 3584:
        d.update(hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 128,
                 num_key_value_heads=max(1, width // 512))
    cfg, dtype = ModelConfig.from_dict(d), torch.bfloat16
    return decode_layer(cfg, HostOps(), probe._weights(cfg, dtype), dtype, 1, context)


def _run(layer, threads: int, warm: bool, repeats: int) -> list[tuple[float, float]]:
    """(median, best) ms per gap of ``layer`` on a worker thread; ``warm``: while it waits for work the worker
    runs a small parallel op every 0.3 ms (its OpenMP threads never go to sleep)."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def worker() -> None:
        torch.set_num_threads(threads)
        buf = torch.zeros(65536 * threads)
        with torch.no_grad():
            while True:
                try:
                    job = jobs.get(timeout=0.0003 if warm else None)
                except queue.Empty:
                    buf.add_(1.0)
                    continue
                if job is None:
                    return
                t = time.perf_counter()
                layer()
                done.put(time.perf_counter() - t)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    for _ in range(5):
        jobs.put(1)
        done.get()
    out = []
    for gap in GAPS_S:
        times = []
        for _ in range(repeats):
            time.sleep(gap)
            jobs.put(1)
            times.append(done.get() * 1e3)
        times.sort()
        out.append((times[len(times) // 2], times[0]))
    jobs.put(None)
    thread.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=3584)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    layer = _layer(a.width, a.context)
    print(f"torch {torch.__version__}, width {a.width}, {a.threads} threads, context {a.context}")
    for warm in (False, True):
        for gap, (med, best) in zip(GAPS_S, _run(layer, a.threads, warm, a.repeats)):
            print(f"{'kept busy' if warm else 'plain':9} gap {gap * 1e3:4.0f} ms: median {med:.3f} ms, best {best:.3f}")


if __name__ == "__main__":
    main()
