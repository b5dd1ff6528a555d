"""Where a host-lane decode step's time went: a bench_stream trace against the planner's step model.

``python -m tools.lane_trace RESULTS_DIR`` reads ``hostlane.json`` and the Perfetto traces
(``hostlane-trace-*.json``: copy, compute and host lanes) that ``tools.bench_stream --host-compute``
wrote there, and for each host-lane configuration prints the measured step, the traced durations
(copy per layer and per lm_head chunk, host per layer), the sum of the lanes, and the step
``memory.lane_schedule.simulate`` gives with those durations; with ``--bus``, the host memory the lane and the
copy engine read together while host layers run (is the memory bus the limit?). A simulated step close to the measured
one says the structure is modelled and any gap to the plan's prediction is in the rates; a gap
between them says the structure is not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from memory.lane_schedule import StepUnit, simulate

LANES = {"copy stream": "copy", "compute stream": "gpu", "host lane (CPU)": "host"}
RESIDENT_S = 0.1e-3  # a resident layer at batch 1-4 (not traced; the traces' handoffs across one took 0.1 ms more)


@dataclass(frozen=True)
class Span:
    lane: str  # "copy", "gpu" or "host"
    name: str  # "layer.3", "layers.7-8" (a run of host layers), "lm_head.0"
    start_ms: float
    end_ms: float

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers the span covers (empty for an lm_head chunk)."""
        kind, _, which = self.name.partition(".")
        if kind not in ("layer", "layers"):
            return ()
        first, _, last = which.partition("-")
        return tuple(range(int(first), int(last or first) + 1))


def load_spans(path: Path) -> list[Span]:
    """The complete spans of a Perfetto trace written by the bench, by start time."""
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [Span(LANES[names[e["tid"]]], e["name"], e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3)
             for e in events if e.get("ph") == "X" and names.get(e["tid"]) in LANES]
    return sorted(spans, key=lambda s: s.start_ms)


def step_starts(spans: list[Span]) -> list[float]:
    """When each traced decode step's first layer (on the GPU or the host) started."""
    chain = [s for s in spans if s.lane != "copy" and s.layers]
    if not chain:
        raise ValueError("the trace holds no compute or host span of a layer")
    first = min(s.layers[0] for s in chain)
    return [s.start_ms for s in chain if s.layers[0] == first]


def traced_units(spans: list[Span], layers: int, host: set[int], head_resident: bool) -> list[StepUnit]:
    """A decode step's units with the traced mean durations (steady steps: the first one is left out)."""
    starts = step_starts(spans)
    if len(starts) < 3:
        raise ValueError(f"the trace holds {len(starts)} decode steps; at least 3 are needed")
    window = [s for s in spans if starts[1] <= s.start_ms < starts[-1]]

    def mean_ms(lane: str, name: str) -> float:
        return statistics.mean(s.ms for s in window if s.lane == lane and s.name == name) / 1e3
    host_spans = [s for s in window if s.lane == "host"]
    per_layer = sum(s.ms for s in host_spans) / max(1, sum(len(s.layers) for s in host_spans)) / 1e3
    copied = {s.name for s in window if s.lane == "copy"}
    units = []
    for i in range(layers):
        name = f"layer.{i}"
        if i in host:
            units.append(StepUnit("host", host_s=per_layer))
        elif name in copied:
            units.append(StepUnit("streamed", copy_s=mean_ms("copy", name), gpu_s=mean_ms("gpu", name)))
        else:
            units.append(StepUnit("resident", gpu_s=RESIDENT_S))
    heads = sorted((n for n in copied if n.startswith("lm_head.")), key=lambda n: int(n.split(".")[1]))
    units += [StepUnit("streamed", copy_s=mean_ms("copy", n), gpu_s=mean_ms("gpu", n)) for n in heads]
    return units + ([StepUnit("resident", gpu_s=RESIDENT_S)] if head_resident else [])


def bus(spans: list[Span], layer_bytes: int) -> dict:
    """Host memory read while the host lane computes (steady steps): the lane's GB/s over its spans, and the copy
    engine's over the same time (its busy fraction there times its GB/s while copying a layer of ``layer_bytes``)."""
    starts = step_starts(spans)
    hosts = [s for s in spans if s.lane == "host" and starts[1] <= s.start_ms < starts[-1]]
    copies = [s for s in spans if s.lane == "copy" and s.name.startswith("layer.")]
    if not hosts or not copies:
        raise ValueError("the trace holds no host span in its steady steps, or no layer copy")
    host_ms = sum(h.ms for h in hosts)
    busy = sum(max(0.0, min(c.end_ms, h.end_ms) - max(c.start_ms, h.start_ms)) for h in hosts for c in copies)
    copying = layer_bytes / statistics.mean(c.ms for c in copies) / 1e6  # GB/s while a layer copies
    host = sum(len(h.layers) for h in hosts) * layer_bytes / host_ms / 1e6
    return {"host_gbps": host, "copy_gbps": copying * busy / host_ms, "copy_busy": busy / host_ms,
            "copying_gbps": copying}


def check(result: dict, trace: Path, layers: int) -> dict:
    """One host-lane configuration of ``hostlane.json`` against its trace (times in ms)."""
    units = traced_units(load_spans(trace), layers, set(result["host_layers"]), result["lm_head_resident"])
    sim = simulate(units, result["num_slots"])
    hosts = [u.host_s for u in units if u.where == "host"]
    return {"step_ms": result["step_s"] * 1e3, "predicted_ms": result["predicted_step_s"] * 1e3,
            "lanes_ms": max(sim.copy_busy_s, sim.host_busy_s + sim.gpu_busy_s) * 1e3,
            "simulated_ms": sim.step_s * 1e3, "host_ms_per_layer": hosts[0] * 1e3 if hosts else 0.0,
            "copy_ms_per_layer": statistics.mean(u.copy_s for u in units[:layers] if u.where == "streamed") * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.lane_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a bench_stream --out-dir holding hostlane.json and its traces")
    p.add_argument("--tag", default="hostlane", help="bench_stream's --tag: reads TAG.json (default: %(default)s)")
    p.add_argument("--bus", action="store_true", help="also the host memory the lane and the copies read together "
                   "during the host layers (the layer's size: the result's host_layer_read_bytes, or --layer-bytes)")
    p.add_argument("--layer-bytes", type=int, help="a layer's bytes for --bus where the results do not say "
                   "(bench_stream before session 34)")
    args = p.parse_args(argv)
    try:
        data = json.loads((args.results / f"{args.tag}.json").read_text())
        rows = [(r, args.results / r["trace_file"]) for r in data["results"] if r.get("host_layers")]
        if not rows:
            raise ValueError("no host-lane configuration in hostlane.json (run bench_stream --host-compute auto)")
        for r, trace in rows:
            if not trace.is_file():
                print(f"{trace.name}: not found, skipped", file=sys.stderr)
                continue
            c = check(r, trace, data["meta"]["layers"])
            print(f"{trace.name}: step {c['step_ms']:.1f} ms (planned {c['predicted_ms']:.1f}); traced durations: "
                  f"copy {c['copy_ms_per_layer']:.2f} ms/layer, host {c['host_ms_per_layer']:.2f} ms/layer, lanes "
                  f"summed {c['lanes_ms']:.1f} ms, simulated {c['simulated_ms']:.1f} ms")
            if args.bus:
                nbytes = args.layer_bytes or r.get("host_layer_read_bytes")
                if not nbytes:
                    raise ValueError(f"{trace.name}: its result has no host_layer_read_bytes; give --layer-bytes")
                b = bus(load_spans(trace), int(nbytes))
                print(f"  during host layers: lane {b['host_gbps']:.1f} GB/s + copies {b['copy_gbps']:.1f} GB/s "
                      f"(busy {b['copy_busy']:.0%}, {b['copying_gbps']:.1f} GB/s while copying) = "
                      f"{b['host_gbps'] + b['copy_gbps']:.1f} GB/s")
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {args.results}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
