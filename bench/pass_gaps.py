"""Why a pass's compute stream sat idle: each gap between two of its kernels, by what the next kernel
waited for, from a torch.profiler chrome trace with CUDA activity.

    python bench/pass_gaps.py TRACE.json[.gz]

A gap counts as **host** when the next kernel's launch call returned after the stream went idle (the GPU
waited for the host to queue it: a host-bound pass), else as **wait** (the kernel was queued in time and
waited on the device: a copy, an event of another stream). The figures show whether cutting host time
(fewer launches, graphs) or device time would shorten a prompt pass (issue 16's TTFT at 16 clients).
"""
from __future__ import annotations

import gzip
import json
import sys
from collections import Counter

LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def _corr(e: dict):
    return e.get("args", {}).get("correlation")


def compute_stream(kernels: list[dict]):
    """The stream with the most kernel time."""
    busy: Counter = Counter()
    for e in kernels:
        busy[e.get("args", {}).get("stream")] += e["dur"]
    return busy.most_common(1)[0][0]


def gaps(trace: dict, min_us: float = 2.0) -> dict:
    """The compute stream's busy time and its gaps over ``min_us``, split into host and wait (ms), with the
    largest of each kind's next kernels by name."""
    ev = [e for e in trace.get("traceEvents", []) if "dur" in e and "ts" in e]
    kernels = [e for e in ev if e.get("cat") == "kernel"]
    if not kernels:
        return {"error": "no kernels in the trace (was CUDA activity on?)"}
    s = compute_stream(kernels)
    ks = sorted((e for e in kernels if e.get("args", {}).get("stream") == s), key=lambda e: e["ts"])
    launch_end = {_corr(e): e["ts"] + e["dur"] for e in ev if e.get("cat") in LAUNCH_CATS and _corr(e) is not None}
    out = {"stream": s, "kernels": len(ks), "window_ms": (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 1e3,
           "busy_ms": sum(e["dur"] for e in ks) / 1e3, "host_ms": 0.0, "wait_ms": 0.0, "unknown_ms": 0.0,
           "host_gaps": 0, "wait_gaps": 0}
    by_name = {"host": Counter(), "wait": Counter()}
    end = ks[0]["ts"] + ks[0]["dur"]
    for e in ks[1:]:
        gap = e["ts"] - end
        if gap > min_us:
            le = launch_end.get(_corr(e))
            kind = "unknown" if le is None else "host" if le >= end else "wait"
            out[f"{kind}_ms"] += gap / 1e3
            if kind != "unknown":
                out[f"{kind}_gaps"] += 1
                by_name[kind][e.get("name", "?")[:60]] += gap / 1e3
        end = max(end, e["ts"] + e["dur"])
    out["top_host"] = [(n, round(v, 2)) for n, v in by_name["host"].most_common(8)]
    out["top_wait"] = [(n, round(v, 2)) for n, v in by_name["wait"].most_common(8)]
    for k in ("window_ms", "busy_ms", "host_ms", "wait_ms", "unknown_ms"):
        out[k] = round(out[k], 2)
    return out


def report(res: dict) -> list[str]:
    if "error" in res:
        return [res["error"]]
    lines = [f"compute stream {res['stream']}: {res['kernels']} kernels over {res['window_ms']} ms, busy "
             f"{res['busy_ms']} ms; idle waiting for the host {res['host_ms']} ms ({res['host_gaps']} gaps), "
             f"waiting on the device {res['wait_ms']} ms ({res['wait_gaps']} gaps), unmatched {res['unknown_ms']} ms"]
    for kind in ("host", "wait"):
        lines += [f"  {kind} gaps before {n}: {v} ms" for n, v in res[f"top_{kind}"]]
    return lines


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


if __name__ == "__main__":
    print("\n".join(report(gaps(load(sys.argv[1])))))
