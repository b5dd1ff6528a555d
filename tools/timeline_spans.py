"""What the timeline picture draws, from trace spans alone (no matplotlib, no CUDA).

Spans are ``streamer.trace.Tracer.timeline()`` dicts: ``{lane, name, start_ms, end_ms}`` with lanes
"copy" (H2D of a streamed unit), "compute" (a unit's kernels on the compute stream: "layer.3",
"lm_head.0"), "host" (a layer a decode step computed on the CPU: the host lane, ``engine.host_lane``)
and, for a traced prefill, "chunk" (one prompt chunk's work inside a layer's compute span).
A :class:`Phase` is one window (one or two decode steps, or a prefill) cut into bars per lane, the
stalls (compute waiting for a copy) and a per-layer axis: a monotone map from ms to a display
coordinate in which every compute span and every stall gets the same width, so microsecond kernels
stay visible next to millisecond copies while the order of events is kept.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass, field

COMPUTE_W = 1.0  # display width of one compute span on the per-layer axis
STALL_W = 1.0  # ... of one stall
GAP_W = 0.3  # ... of any other gap (host launches, the step's sync)


@dataclass(frozen=True)
class Bar:
    """One interval on a lane, in ms since the trace's origin."""

    name: str
    start: float
    end: float

    @property
    def ms(self) -> float:
        return self.end - self.start


@dataclass
class Phase:
    """One window of the trace, ready to draw."""

    title: str
    t0: float
    t1: float
    copies: list[Bar]
    computes: list[Bar]
    chunks: list[Bar]
    stalls: list[Bar]
    hosts: list[Bar] = field(default_factory=list)  # layers computed on the CPU (host lane)
    knots_t: list[float] = field(default_factory=list)  # per-layer axis: ms ...
    knots_x: list[float] = field(default_factory=list)  # ... and where they are drawn

    def warp(self, t: float) -> float:
        """The per-layer axis coordinate of time ``t`` (piecewise linear between the knots)."""
        t = min(max(t, self.knots_t[0]), self.knots_t[-1])
        i = min(bisect_right(self.knots_t, t), len(self.knots_t) - 1)
        if i == 0:
            return self.knots_x[0]
        ta, tb, xa, xb = self.knots_t[i - 1], self.knots_t[i], self.knots_x[i - 1], self.knots_x[i]
        return xa if tb == ta else xa + (xb - xa) * (t - ta) / (tb - ta)

    def stats(self) -> dict:
        """Real totals of the window (ms): its length, copies, compute spans, prompt chunks and stalls."""
        return {"window_ms": self.t1 - self.t0, "copies": len(self.copies),
                "units_copied": len({b.name for b in self.copies}), "copy_busy_ms": _merged_ms(self.copies),
                "compute_spans": len(self.computes), "compute_ms": sum(b.ms for b in self.computes),
                "chunks": len(self.chunks), "stalls": len(self.stalls), "stall_ms": sum(b.ms for b in self.stalls),
                "host_spans": len(self.hosts), "host_ms": sum(b.ms for b in self.hosts)}

    def summary(self) -> str:
        """One line of real totals for the panel's title."""
        st = self.stats()
        host = f", host lane {st['host_ms']:.2f} ms in {st['host_spans']} layers" if self.hosts else ""
        return (f"{st['window_ms']:.2f} ms: {st['copies']} copies (copy lane busy {st['copy_busy_ms']:.2f} ms), "
                f"compute {st['compute_ms']:.3f} ms in {st['compute_spans']} spans{host}, {st['stalls']} stalls "
                f"{st['stall_ms']:.2f} ms")


def _bars(spans: list[dict], lane: str) -> list[Bar]:
    return sorted((Bar(s["name"], s["start_ms"], s["end_ms"]) for s in spans if s["lane"] == lane),
                  key=lambda b: (b.start, b.end))


def _merged_ms(bars: list[Bar]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for b in sorted(bars, key=lambda b: b.start):
        if cur_e is None or b.start > cur_e:
            total += 0.0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = b.start, b.end
        else:
            cur_e = max(cur_e, b.end)
    return total + (0.0 if cur_e is None else cur_e - cur_s)


def find_stalls(spans: list[dict], origin: float | None = None) -> list[Bar]:
    """Compute waiting for a copy: the gap before a unit's compute span when the unit's latest copy
    (begun before that compute) ended after the previous compute span ended (as memreport counts them);
    the first compute span counts from ``origin`` (e.g. a prefill's first copy), when given."""
    copies: dict[str, list[Bar]] = defaultdict(list)
    for b in _bars(spans, "copy"):
        copies[b.name].append(b)
    stalls, prev_end = [], origin
    for c in _bars(spans, "compute"):
        cp = [b for b in copies.get(c.name, []) if b.start <= c.start]
        if prev_end is not None and cp and cp[-1].end > prev_end and c.start > prev_end:
            stalls.append(Bar(c.name, prev_end, c.start))
        prev_end = c.end if prev_end is None else max(prev_end, c.end)
    return stalls


def decode_steps(spans: list[dict]) -> list[tuple[float, float]]:
    """Step windows of a decode trace without step events: a step starts where the first traced unit's
    compute starts again, and the last one ends with its last compute span."""
    comp = _bars(spans, "compute")
    if not comp:
        return []
    starts = [c.start for c in comp if c.name == comp[0].name]
    return list(zip(starts, starts[1:])) + [(starts[-1], max(c.end for c in comp))]


def _clip(bars: list[Bar], t0: float, t1: float) -> list[Bar]:
    return [Bar(b.name, max(b.start, t0), min(b.end, t1)) for b in bars if b.end > t0 and b.start < t1]


def _knots(computes: list[Bar], stalls: list[Bar], t0: float, t1: float) -> tuple[list[float], list[float]]:
    """The per-layer axis: each compute span and each stall one unit wide, other gaps ``GAP_W``."""
    stall_ends = {round(s.end, 9) for s in stalls}
    ts, xs = [t0], [0.0]

    def add(t: float, width: float) -> None:
        if t > ts[-1]:
            ts.append(t)
            xs.append(xs[-1] + width)

    for c in computes:
        add(c.start, STALL_W if round(c.start, 9) in stall_ends else GAP_W)
        add(c.end, COMPUTE_W)
    add(t1, GAP_W)
    return ts, xs


def make_phase(spans: list[dict], t0: float, t1: float, title: str) -> Phase:
    """The window [t0, t1] of a trace: bars clipped to it, its stalls and its per-layer axis."""
    if not t1 > t0:
        raise ValueError(f"empty timeline window [{t0}, {t1}] ms: the trace holds no compute span")
    computes = _clip(_bars(spans, "compute"), t0, t1)
    hosts = _clip(_bars(spans, "host"), t0, t1)
    stalls = _clip(find_stalls(spans, origin=t0), t0, t1)
    ts, xs = _knots(sorted(computes + hosts, key=lambda b: (b.start, b.end)), stalls, t0, t1)
    return Phase(title, t0, t1, _clip(_bars(spans, "copy"), t0, t1), computes, _clip(_bars(spans, "chunk"), t0, t1),
                 stalls, hosts, ts, xs)


def decode_phase(spans: list[dict], bounds: list[float] | None = None, steps: int = 2) -> Phase | None:
    """The last ``steps`` decode steps (``bounds``: step-start events, and the end; else found from the
    compute spans), or None when the trace holds none."""
    windows = list(zip(bounds, bounds[1:])) if bounds and len(bounds) > 1 else decode_steps(spans)
    if not windows:
        return None
    t0, t1 = windows[-steps:][0][0], windows[-1][1]
    n = len(windows[-steps:])
    return make_phase(spans, t0, t1, f"decode, {'last step' if n == 1 else f'last {n} steps'}")


def prefill_phase(spans: list[dict]) -> Phase | None:
    """A traced prefill from its first span to its last compute span, or None without compute spans.
    Copies of a unit begun after its compute started prefetch the next pass (the pipeline refills the
    freed slots with the first units again): they are left out, so each copy drawn is the prefill's own."""
    comp = _bars(spans, "compute")
    if not comp:
        return None
    first: dict[str, float] = {}
    for b in comp:
        first.setdefault(b.name, b.start)
    spans = [s for s in spans if not (s["lane"] == "copy" and s["start_ms"] > first.get(s["name"], float("inf")))]
    t0 = min(min(b.start for b in comp), min((b.start for b in _bars(spans, "copy")), default=comp[0].start))
    n_chunks = len({b.name for b in _bars(spans, "chunk")})
    per_layer = f", {n_chunks} prompt chunk{'s' if n_chunks > 1 else ''} per layer" if n_chunks else ""
    return make_phase(spans, t0, max(b.end for b in comp), f"prefill (layer-major{per_layer})")


def short_label(name: str) -> str:
    """Axis label of a unit: "layer.12" -> "12", "lm_head.0" -> "h0"."""
    kind, _, idx = name.rpartition(".")
    if kind == "layer":
        return idx
    return f"h{idx}" if kind == "lm_head" else name
