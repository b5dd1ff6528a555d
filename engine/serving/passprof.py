"""``LAYERSTREAM_PROFILE_PASSES=DIR[:N]``: a server's first N passes after its warm-up that feed prompts (at least
``MIN_TOKENS`` waiting; N default 4) run under cProfile on the thread that steps the scheduler, each written to
``DIR/pass_<step>.txt``: its prompt tokens, wall and thread CPU time, then the functions by own time and by
cumulative time.

Why: a served prompt pass and the same pass run in process (bench/burst_probe.py) took different times on an
H200 (session 28: 422-427 ms served against 265-436 ms in process, with kernels/fastlaunch.py and packed stacking
on), and a step's line in ``--step-log`` cannot say where a pass's time went. The profile tells the host's own
work from its waits: a pass bound by the device spends its end in the synchronising call that reads the logits
(``tolist``, CUDA's default sync spins, so it counts as CPU time too); one bound by the host spends it in the
launch path. Each report also says what the rest of the host did meanwhile (the machine's CPU time by kind from
``/proc/stat``, steal included: a virtual machine's vCPU taken away by its host; the thread's context switches and
the CPU it ran on; the busiest threads of every process by CPU ticks; the cyclic garbage collector's runs and
time): session 29 found passes running every Python function ~1.75x slower than others on the same machine, and
the profile alone cannot say why.
From Python 3.12 cProfile listens through ``sys.monitoring``, whose events come from every thread: a report then
also holds the other threads' calls made during the pass (the server's watcher sleeping 0.1 s at a time showed up
as ``time.sleep`` "called by" the launch path in session 29), so read the thread CPU line and the host report for
the stepping thread alone. Write errors are logged, never raised: a profile must not fail a request.
"""

from __future__ import annotations

import cProfile
import gc
import io
import logging
import os
import pstats
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
TOP = 45  # functions listed in each order
CALLERS_OF = "sleep|pin_memory|embedding"  # calls whose callers each report lists (seen slow in session 29)
MIN_TOKENS = 256  # prompt tokens waiting for a pass to be one worth profiling
EVERY_THREAD = "; its calls include other threads'" if sys.version_info >= (3, 12) else ""  # see the docstring


class PassProfiler:
    """Profiles the first ``limit`` prompt passes into ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, limit: int = 4) -> None:
        self.directory, self.limit, self.done = directory, limit, 0

    @classmethod
    def from_env(cls) -> PassProfiler | None:
        """The profiler ``LAYERSTREAM_PROFILE_PASSES`` asks for, or None (unset or empty)."""
        spec = os.environ.get("LAYERSTREAM_PROFILE_PASSES", "")
        if not spec:
            return None
        where, sep, count = spec.rpartition(":")
        if not (sep and where and count.isdigit()):
            where, count = spec, "4"
        return cls(Path(where), int(count))

    def wants(self, prompt_tokens: int) -> bool:
        """Whether the next pass, with this many prompt tokens waiting, is profiled: one of the first ``limit``
        with at least ``MIN_TOKENS`` (a load test's one-request warm-up, a few tokens, is not the pass to see)."""
        return prompt_tokens >= MIN_TOKENS and self.done < self.limit

    def run(self, step: int, fn: Callable[[], T], tokens: Callable[[], int]) -> T:
        """``fn()`` under cProfile; its report (``tokens()`` read after it) as ``pass_<step>.txt``."""
        prof = cProfile.Profile()
        host0, collector = _host_snapshot(), _GcTimer()
        gc.callbacks.append(collector)
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            result = prof.runcall(fn)
        finally:
            gc.callbacks.remove(collector)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        host = _host_report(host0, _host_snapshot()) + collector.report()
        self.done += 1
        out = io.StringIO()
        out.write(f"pass at step {step}: {tokens()} tokens, {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms thread CPU "
                  f"(under cProfile{EVERY_THREAD})\n")
        out.write(host)
        for order in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(TOP)
        pstats.Stats(prof, stream=out).print_callers(CALLERS_OF)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / f"pass_{step}.txt").write_text(out.getvalue(), encoding="utf-8")
        except OSError as e:
            log.warning("LAYERSTREAM_PROFILE_PASSES: cannot write %s (%s)", self.directory, e)
        return result


class _GcTimer:
    """A ``gc.callbacks`` entry: the cyclic collector's runs by generation and their time, meanwhile."""

    def __init__(self) -> None:
        self.runs, self.seconds, self.started = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.runs[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self.started

    def report(self) -> str:
        runs = ", ".join(f"gen{g} {n} ({s * 1e3:.1f} ms)" for g, (n, s) in enumerate(zip(self.runs, self.seconds)))
        return f"garbage collections: {runs}; {gc.get_freeze_count()} objects frozen\n"


def _host_snapshot() -> tuple:
    """The machine's CPU ticks by kind, this thread's usage and CPU, and every thread's CPU ticks (best effort)."""
    try:
        stat = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        cpu_now = int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return [], -1, resource.getrusage(resource.RUSAGE_THREAD), {}
    threads = {}
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*/stat"):
        try:
            name, rest = task.read_text().rsplit(")", 1)
            fields = rest.split()
            threads[task.parent.name] = (name.split("(", 1)[1], task.parts[2], int(fields[11]) + int(fields[12]),
                                         int(fields[36]))
        except (OSError, ValueError, IndexError):
            continue
    return stat, cpu_now, resource.getrusage(resource.RUSAGE_THREAD), threads


def _host_report(before: tuple, after: tuple) -> str:
    """What the host did between two snapshots: CPU by kind, this thread's switches, the busiest threads."""
    (s0, cpu0, r0, t0), (s1, cpu1, r1, t1) = before, after
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    delta = [b - a for a, b in zip(s0, s1)][: len(kinds)]
    total = sum(delta) or 1
    lines = ["host: " + " ".join(f"{k} {100 * d / total:.1f}%" for k, d in zip(kinds, delta)),
             f"this thread: CPU {cpu0} -> {cpu1}, {r1.ru_nvcsw - r0.ru_nvcsw} voluntary and "
             f"{r1.ru_nivcsw - r0.ru_nivcsw} involuntary context switches; load average {os.getloadavg()[0]:.1f}"]
    busy = sorted(((v[2] - t0[tid][2], v[1], tid, v[0], v[3]) for tid, v in t1.items() if tid in t0), reverse=True)
    lines += [f"  {ticks:4d} ticks  pid {pid:>7} tid {tid:>7} last on CPU {cpu:>3}  {name}"
              for ticks, pid, tid, name, cpu in busy[:12] if ticks]
    return "\n".join(lines) + "\n"
