"""What overlapped in a torch.profiler chrome trace: per CUDA stream and kind, busy time, and how much
the compute and the copies ran at the same time.

    python bench/trace_overlap.py TRACE.json[.gz]

Used by ``bench/intake_probe.py --trace`` on the GPU machine; runs anywhere on a saved trace.
Kinds: ``kernel``, ``HtoD``, ``DtoH``, ``DtoD``, ``memset``. "compute" is every kernel; "H2D" every
host-to-device copy (weights and prompt states, whatever the stream). Host figures: the thread time
blocked in CUDA synchronisation calls and the count of launches, over the same window.
"""
from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _total(iv: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in iv)


def _intersect(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _kind(e: dict) -> str:
    if e.get("cat") == "kernel":
        return "kernel"
    name = e.get("name", "")
    for k in ("HtoD", "DtoH", "DtoD"):
        if k in name:
            return k
    return "memset" if "emset" in name else "other"


def overlap(trace: dict) -> dict:
    """Busy ms per (stream, kind), the compute/copy overlap and the host's blocked time, in ms."""
    gpu = [e for e in trace.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
           and "dur" in e]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    by: dict[str, list] = defaultdict(list)
    for e in gpu:
        by[f"stream {e.get('args', {}).get('stream', '?')} {_kind(e)}"].append((e["ts"], e["ts"] + e["dur"]))
    kinds: dict[str, list] = defaultdict(list)
    for e in gpu:
        kinds[_kind(e)].append((e["ts"], e["ts"] + e["dur"]))
    comp, h2d, d2h = (_union(kinds.get(k, [])) for k in ("kernel", "HtoD", "DtoH"))
    anything = _union([iv for ivs in kinds.values() for iv in ivs])
    host = [e for e in trace["traceEvents"] if e.get("cat") == "cuda_runtime" and "dur" in e and t0 <= e["ts"] <= t1]
    blocked = sum(e["dur"] for e in host if "Synchronize" in e.get("name", ""))
    launches = sum(1 for e in host if "Launch" in e.get("name", ""))
    gaps = [b[0] - a[1] for a, b in zip(anything, anything[1:])]
    ms = lambda us: round(us / 1e3, 2)  # noqa: E731
    return {
        "window_ms": ms(t1 - t0),
        "busy_ms": {k: ms(_total(_union(v))) for k, v in sorted(by.items())},
        "compute_ms": ms(_total(comp)), "h2d_ms": ms(_total(h2d)), "d2h_ms": ms(_total(d2h)),
        "compute_and_h2d_ms": ms(_total(_intersect(comp, h2d))),
        "gpu_idle_ms": ms(t1 - t0 - _total(anything)),
        "idle_gaps_over_50us": sum(1 for g in gaps if g > 50), "idle_in_gaps_over_50us_ms": ms(sum(g for g in gaps if g > 50)),
        "compute_idle_h2d_busy_ms": ms(_total(h2d) - _total(_intersect(comp, h2d))),
        "host_blocked_in_sync_ms": ms(blocked), "launches": launches,
    }


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


if __name__ == "__main__":
    print(json.dumps(overlap(load(sys.argv[1])), indent=1))
