"""Does the host lane's read rate depend on which memory it reads? Per buffer, the bf16 GEMV rate on the lane's
pinned worker, over many buffers and several passes.

Why: in session 39 one process ran the same host-lane plan at 4.8 ms and at 12.8 ms a layer (every host run of
the slow configuration 2x), with no other thread on the lane's cores (bench/thread_sampler.py). A VM's memory can
be backed by more than one socket of its host, which the guest cannot see; the CPU then reads some buffers from
remote memory, slower, while the GPU's DMA (deeply pipelined) hardly notices. If so, per-buffer rates fall into
groups that stay the same from pass to pass.

    python bench/probe_mem_placement.py --buffers 16 --mib 1024 --passes 3 [--pinned]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from engine.host_worker import HostWorker, machine_pick
from memory.host_rate import gemv_gbps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--buffers", type=int, default=16)
    p.add_argument("--mib", type=int, default=1024, help="MiB a buffer")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pinned", action="store_true", help="page-locked buffers (cudaHostAlloc), as the streamer's")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    hidden = 4096
    rows = (args.mib << 20) // (hidden * 2)
    bufs = []
    for i in range(args.buffers):
        w = torch.empty((rows, hidden), dtype=torch.bfloat16, pin_memory=args.pinned)
        w.fill_(0.01 * (i + 1))  # the values do not change a GEMV's time
        bufs.append(w)
    x = torch.randn((args.batch, hidden)).to(torch.bfloat16)
    worker = HostWorker(machine_pick(False), name="probe-lane")
    print(worker.pick.describe(), f"| {args.buffers} x {args.mib} MiB {'pinned' if args.pinned else 'plain'}, "
          f"batch {args.batch}")
    table = [[] for _ in bufs]
    for p_ in range(args.passes):
        order = list(range(len(bufs))) if p_ % 2 == 0 else list(reversed(range(len(bufs))))
        for i in order:
            table[i].append(worker.submit(gemv_gbps, bufs[i], x, args.reps).result())
    worker.close()
    for i, rates in enumerate(table):
        print(f"buffer {i:3d} @ {bufs[i].data_ptr():#x}: " + " ".join(f"{r:6.1f}" for r in rates) + " GB/s")
    meds = sorted(statistics.median(r) for r in table)
    print(f"per-buffer medians: min {meds[0]:.1f}, p25 {meds[len(meds) // 4]:.1f}, p50 {meds[len(meds) // 2]:.1f}, "
          f"max {meds[-1]:.1f} GB/s; pass-to-pass spread (max/min of a buffer's rates), median "
          f"{statistics.median(max(r) / min(r) for r in table):.2f}")


if __name__ == "__main__":
    main()
