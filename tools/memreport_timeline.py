"""Copy vs compute analysis of a traced decode run for ``tools/memreport.py``: per step and per module
compute, copy, host-lane and stall time, achieved GB/s, measured vs predicted tok/s, and a one-line verdict.
The host lane (``engine.host_lane``: layers computed on the CPU) is the third row of the timeline.

Spans come from ``streamer.trace.Tracer.timeline()`` ({lane, name, start_ms, end_ms}); step boundaries are
CUDA events recorded at the start of each observed step (and after the last), in ms since ``mark()``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from streamer.trace import busy_fraction


def analyze_timeline(spans: list[dict], bounds: list[float], unit_bytes: dict[str, int]) -> dict:
    """Per step and per module: compute, copy and stall ms; GB/s. A stall is the gap before a streamed
    unit's compute when its copy ended after the previous compute span ended."""
    computes = sorted((s for s in spans if s["lane"] == "compute"), key=lambda s: s["start_ms"])
    copies = defaultdict(list)
    for s in sorted((s for s in spans if s["lane"] == "copy"), key=lambda s: s["start_ms"]):
        copies[s["name"]].append(s)
    hosts = [s for s in spans if s["lane"] == "host"]
    per = defaultdict(lambda: {"compute_ms": 0.0, "copy_ms": 0.0, "stall_ms": 0.0, "host_ms": 0.0, "bytes": 0})
    steps, stalls = [], []
    for t0, t1 in zip(bounds, bounds[1:]):
        prev_end, row = t0, {"start_ms": t0, "step_ms": t1 - t0, "compute_ms": 0.0, "copy_ms": 0.0,
                             "stall_ms": 0.0, "host_ms": 0.0, "streamed_bytes": 0}
        for h in (h for h in hosts if t0 <= h["start_ms"] < t1):
            row["host_ms"] += h["end_ms"] - h["start_ms"]
            per[h["name"]]["host_ms"] += h["end_ms"] - h["start_ms"]
        for c in (c for c in computes if t0 <= c["start_ms"] < t1):
            m, dur = per[c["name"]], c["end_ms"] - c["start_ms"]
            row["compute_ms"] += dur
            m["compute_ms"] += dur
            cp = [x for x in copies.get(c["name"], []) if x["start_ms"] <= c["start_ms"]]
            if c["name"] in unit_bytes and cp:
                cp_ms = cp[-1]["end_ms"] - cp[-1]["start_ms"]
                row["copy_ms"] += cp_ms
                m["copy_ms"] += cp_ms
                row["streamed_bytes"] += unit_bytes[c["name"]]
                m["bytes"] = unit_bytes[c["name"]]
                if cp[-1]["end_ms"] > prev_end and c["start_ms"] > prev_end:
                    gap = c["start_ms"] - prev_end
                    row["stall_ms"] += gap
                    m["stall_ms"] += gap
                    stalls.append({"name": c["name"], "start_ms": prev_end, "end_ms": c["start_ms"]})
            prev_end = max(prev_end, c["end_ms"])
        row["other_ms"] = max(0.0, row["step_ms"] - row["compute_ms"] - row["stall_ms"] - row["host_ms"])
        row["copy_gbps"] = row["streamed_bytes"] / row["copy_ms"] / 1e6 if row["copy_ms"] > 0 else None
        row["effective_gbps"] = row["streamed_bytes"] / row["step_ms"] / 1e6 if row["step_ms"] > 0 else None
        steps.append(row)
    k = max(1, len(steps))
    modules = [{"name": name, **{f: v / k if f != "bytes" else v for f, v in m.items()}} for name, m in per.items()]
    window = [s for s in spans if bounds and bounds[0] <= s["start_ms"] < bounds[-1]]
    total_ms = bounds[-1] - bounds[0] if len(bounds) > 1 else 0.0
    return {"steps": steps, "modules": modules, "stalls": stalls,
            "copy_busy_fraction": busy_fraction(window, "copy", total_ms),
            "compute_busy_fraction": busy_fraction(window, "compute", total_ms),
            "host_busy_fraction": busy_fraction(window, "host", total_ms)}


def summarize(run: dict, timeline: dict | None, batch: int, plan) -> dict:
    """Headline timing: median step, measured vs predicted tok/s, achieved vs peak GB/s, the verdict."""
    steps = timeline["steps"] if timeline and timeline["steps"] else None
    step_ms = statistics.median([s["step_ms"] for s in steps] if steps else run["host_step_ms"])
    issue_ms = statistics.median(run["issue_ms"])
    out = {"step_ms": step_ms, "measured_tok_s": batch * 1e3 / step_ms if step_ms > 0 else 0.0,
           "predicted_tok_s": plan.predicted_tok_s, "predicted_step_ms": plan.predicted_step_s * 1e3,
           "warmup_ms": run["warmup_ms"], "host_issue_ms": issue_ms, "peak_h2d_gbps": plan.h2d_gbps,
           "h2d_source": plan.h2d_source, "observed_steps": run["observed"], "prompt_tokens": run["prompt_tokens"]}
    if run.get("graph_step_ms"):  # generation's own path: CUDA-graph replay
        out["graph_step_ms"] = statistics.median(run["graph_step_ms"])
        out["graph_tok_s"] = batch * 1e3 / out["graph_step_ms"]
    if not steps:
        return out
    tot = {f: sum(s.get(f, 0.0) for s in steps) for f in ("step_ms", "compute_ms", "copy_ms", "stall_ms",
                                                           "other_ms", "host_ms", "streamed_bytes")}
    out.update({f"mean_{f}": v / len(steps) for f, v in tot.items() if f != "streamed_bytes"})
    out["streamed_bytes_per_step"] = tot["streamed_bytes"] // len(steps)
    out["copy_gbps"] = tot["streamed_bytes"] / tot["copy_ms"] / 1e6 if tot["copy_ms"] > 0 else None
    out["effective_gbps"] = tot["streamed_bytes"] / tot["step_ms"] / 1e6 if tot["step_ms"] > 0 else None
    frac = {k: tot[f] / tot["step_ms"] for k, f in (("stall", "stall_ms"), ("compute", "compute_ms"),
                                                    ("other", "other_ms"), ("host", "host_ms"))}
    idle = out["mean_step_ms"] - out["mean_copy_ms"]
    if frac["stall"] >= 0.2:
        out["verdict"] = (f"copy-bound: compute waits for weight copies {100 * frac['stall']:.0f}% of each step; the "
                          f"copy lane is idle {idle:.1f} ms per step (all staging slots full, e.g. during the "
                          "resident layers); more resident layers (budget) or a faster link would help")
    elif frac["host"] >= 0.5:
        out["verdict"] = (f"host-lane-bound: layers computed on the CPU take {100 * frac['host']:.0f}% of each "
                          "step; fewer host layers (--host-compute N) would shift work to the copy engine")
    elif issue_ms >= 0.8 * step_ms:
        out["verdict"] = (f"host-bound (kernel launches): Python takes {issue_ms:.1f} ms to issue a step's kernels "
                          f"of a {step_ms:.1f} ms step, so the GPU runs them as they come; fewer or fused kernels, "
                          "or CUDA graphs, would help")
    elif frac["other"] >= 0.3:
        out["verdict"] = (f"host-bound: {100 * frac['other']:.0f}% of each step is neither layer compute nor copy "
                          "waits (embedding rows, final norm, sampling, the per-step sync)")
    else:
        out["verdict"] = f"compute-bound: layer kernels fill {100 * frac['compute']:.0f}% of each step"
    return out
