"""Per-unit copy and compute timing with CUDA events, for timelines and overlap figures.

Only used when tracing is asked for (benchmarks, memreport): every begin/end records a
timing event on the given stream; nothing is read back until ``timeline()`` is called,
so tracing adds no host synchronisation to the steps it observes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class Tracer:
    """Collects (lane, label, start event, end event) spans on CUDA streams."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.origin = None
        self.open: dict[tuple[str, str], object] = {}
        self.spans: list[tuple[str, str, object, object]] = []

    def mark(self, stream=None) -> None:
        """Start a new trace window: spans are timed relative to this point."""
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record(stream or torch.cuda.current_stream())
        self.spans.clear()
        self.open.clear()

    def begin(self, lane: str, name: str, stream) -> None:
        """Open span ``name`` on ``lane`` at this point of ``stream``."""
        if self.origin is None:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        self.open[(lane, name)] = ev

    def end(self, lane: str, name: str, stream) -> None:
        """Close span ``name`` on ``lane`` at this point of ``stream``."""
        key = (lane, name)
        start = self.open.pop(key, None)
        if start is None:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        self.spans.append((lane, key[1], start, ev))

    def timeline(self) -> list[dict]:
        """Synchronise once and return spans in ms since ``mark()``."""
        if self.origin is None:
            return []
        torch.cuda.synchronize()
        return [{"lane": lane, "name": name, "start_ms": self.origin.elapsed_time(s),
                 "end_ms": self.origin.elapsed_time(e)} for lane, name, s, e in self.spans]


def busy_fraction(spans: list[dict], lane: str, window_ms: float) -> float:
    """Fraction of ``window_ms`` during which ``lane`` had a span running (overlaps merged)."""
    ivs = sorted((s["start_ms"], s["end_ms"]) for s in spans if s["lane"] == lane)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in ivs:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy / window_ms if window_ms > 0 else 0.0


def write_chrome_trace(spans: list[dict], path: Path) -> None:
    """Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing); written atomically."""
    lanes = {"copy": 1, "compute": 2, "host": 3}  # host: layers computed on the CPU (engine.host_lane)
    events = [{"name": s["name"], "ph": "X", "pid": 1, "tid": lanes.get(s["lane"], 3),
               "ts": s["start_ms"] * 1000.0, "dur": (s["end_ms"] - s["start_ms"]) * 1000.0} for s in spans]
    events += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t,
                "args": {"name": "host lane (CPU)" if n == "host" else f"{n} stream"}}
               for n, t in lanes.items()]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps({"traceEvents": events}))
    tmp.replace(path)
