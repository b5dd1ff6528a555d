"""Run a command and sample, every few ms, what its threads and the machine's CPUs do (Linux /proc).

Why: the host lane's layers took 2-3x their usual time in some runs of one process (session 39, H200:
the same plan at 4.8 and at 12.8 ms a layer). This tells whether another thread of the process (compile
ahead, a streamer thread, the main thread) shares the lane's cores, or the hypervisor steals them.

    python bench/thread_sampler.py --out samples.txt -- python -m tools.bench_stream ...

Prints the command's output with the seconds since start in front of each line; then per window
(``--window`` s): the CPUs' busy and steal %, and the process's busiest threads (name, tid, CPU % of
one core, the CPUs it ran on).
"""

from __future__ import annotations

import argparse
import os
import collections
import subprocess
import sys
import threading
import time
from pathlib import Path


def cpu_ticks() -> dict[str, list[int]]:
    """/proc/stat's per-CPU lines: cpuN -> [user nice system idle iowait irq softirq steal ...]."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            out[name] = [int(v) for v in vals]
    return out


def thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, utime + stime in ticks, last CPU) for every thread of ``pid``."""
    out = {}
    for d in Path(f"/proc/{pid}/task").glob("*"):
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
        out[int(d.name)] = (name, int(fields[11]) + int(fields[12]), int(fields[36]))
    return out


def summarise(t: float, window: float, c0, c1, th0, th1, ran_on, hz: int, top: int, pid: int) -> str:
    busy = steal = 0
    for cpu, v1 in c1.items():
        v0 = c0.get(cpu, v1)
        d = [b - a for a, b in zip(v0, v1)]
        total = sum(d[:8]) or 1
        busy += 100 * (total - d[3] - d[4]) / total
        steal += 100 * d[7] / total if len(d) > 7 else 0
    rows = []
    for tid, (name, ticks, _) in th1.items():
        used = ticks - (th0[tid][1] if tid in th0 else 0)  # a thread born in the window: all its time
        if used > 0:
            rows.append((used, name, tid))
    rows.sort(reverse=True)
    parts = [f"{'MAIN' if tid == pid else name}:{tid} {100 * used / hz / window:.0f}% cpus {sorted(ran_on[tid])}" for used, name, tid in rows[:top]]
    return (f"[{t:7.1f}s] cpus busy {busy:.0f}% (of {100 * len(c1)}), steal {steal:.1f}% | "
            + "; ".join(parts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="file for the windows' summaries")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    p.add_argument("--window", type=float, default=1.0, help="seconds per summary line")
    p.add_argument("--top", type=int, default=6, help="threads per summary line")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run")
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give the command to run after --")
    hz = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def echo() -> None:
        for line in proc.stdout:
            print(f"[{time.monotonic() - start:7.1f}s] {line}", end="", flush=True)
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    with open(args.out, "w") as out:
        c0, th0, w0 = cpu_ticks(), thread_ticks(proc.pid), time.monotonic()
        ran_on: dict[int, set[int]] = collections.defaultdict(set)
        prev = th0
        while proc.poll() is None:
            time.sleep(args.interval)
            th = thread_ticks(proc.pid)
            for tid, (_, ticks, cpu) in th.items():
                if tid not in prev or ticks != prev[tid][1] or prev[tid][2] != cpu:
                    ran_on[tid].add(cpu)  # it ran since the last sample
            prev = th
            now = time.monotonic()
            if now - w0 >= args.window and th:
                c1 = cpu_ticks()
                out.write(summarise(now - start, now - w0, c0, c1, th0, th, ran_on, hz, args.top, proc.pid) + "\n")
                out.flush()
                c0, th0, w0, ran_on = c1, th, now, collections.defaultdict(set)
    reader.join(timeout=5)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
