"""The host compute lane: which non-resident layers a decode step computes on the CPU.

At small batch a streamed layer is bound by PCIe, while the CPU can read the same bytes from
host memory at its own bandwidth. With ``h`` layers computed on the host and ``s`` streamed,
the copy engine moves the ``s`` layers (and lm_head chunks, embedding rows) while the CPU
computes the ``h`` ones. The lanes are not independent (``memory.lane_schedule``): a host layer's
output is the next layer's input, so the host lane and the GPU's own compute form one chain, and
the copy engine runs at most ``num_slots`` units ahead of that chain. The step is predicted by
simulating it unit by unit (:func:`memory.lane_schedule.simulate`), not as
``max(copy lane, host lane + GPU compute)``, which the H200 traces showed to be optimistic.

Only layers pinned in host memory are candidates (the CPU must not read the disk tier). ``auto``
tries every count of host layers, spread evenly among the candidates, then moves the best counts'
host layers one candidate left or right while the simulated step improves (a bounded number of
tries); with a known host rate it also tries the other lm_head residency (``memory.planner``): a
streamed lm_head's chunks are copied at the end of a step, where the host lane has nothing to do.
A prefill always streams every non-resident layer (host layers included).

What the traces showed (Qwen2.5-7B bf16 on the H200 host, 16 cores, 2 staging slots; the Perfetto
traces that bench_stream wrote beside bench/results/2026-12-01-h200-s7-first-run, -s7-serve-hostlane
and -s7-quant/hostlane.json, not committed; ``python -m tools.lane_trace DIR`` prints the first point's
figures for each folder):

* Every host-lane step took 1.14-1.70x the old prediction (step_over_predicted in hostlane.json).
  Feeding each trace's own mean durations (copies 8.5-9.0 ms per 466 MB layer and 6.7 ms per lm_head
  chunk, host layers 8.3-12.1 ms, GPU 0.15 ms per streamed unit) into the sum of lanes gives
  115-144 ms where the steps took 122.6-145.4 ms; the unit by unit simulation comes within 1.1% of
  all nine host-lane steps (s7-serve-hostlane b1 6 GiB: 128.0 vs 127.1 ms, b1 4 GiB: 144.7 vs
  145.4, b4 6 GiB: 141.7 vs 142.9, b4 4 GiB: 146.7 vs 145.2; s7-quant b1 6 GiB: 134.2 vs 134.4).
  Two causes, of different weight per run:
* the host rate. Planned from one large GEMV alone (70.6 GB/s: 6.6 ms per layer), a host layer
  took 8.5-9.0 ms when no copy ran and 9.2-9.9 ms beside copies (47-51 GB/s). Measured next to H2D
  copies (s7-quant: 36.8 GB/s, 12.7 ms per layer) the rate came within 5% of the traced 12.1 ms.
* the structure. In s7-quant (8 resident layers, lm_head streamed in 3 chunks, host layers 1, 4, 7,
  9, 14, 16, 19, 22, 25) the step took 134.4 ms where its lanes summed to 117.6 ms. The host lane
  waited 22 ms a step at the boundary: lm_head chunks 1 and 2 and the next step's streamed layer 0
  were copied one after the other (21.6 ms) with no host layer to run; and the copy engine idled
  16-23 ms a step in its middle, both slots full while the chain was in a host layer. The handoffs
  are small: 0.001-0.04 ms (medians) from a GPU layer to the host, 0.09-0.11 ms back, 0.5-0.6 ms
  between steps; the main thread, blocked while the worker computes, adds nothing visible (the
  streamer's next copy is already queued behind its slot's free event and starts when it fires).

With s7-quant's inputs (rates 36.8 and 55.3 GB/s) this module now picks host layers 0, 4, 8, 11,
15, 18, 22, 26 on the same residency (lm_head resident would leave 5 layers and simulate slower)
and predicts 123.4 ms; simulated with that run's traced durations this layout takes 126.4 ms,
against 134.4 ms measured and 134.7 ms simulated for the old one. A third staging slot in place of
a resident layer simulated slower in every layout tried. With that run's traced durations the best
layout a wider search found (any single swap, either residency) simulated 121.8 ms: 1.53x the
186.2 ms of streaming every layer, short of the 1.7x target; with s7-serve-hostlane's (host 9.6 ms,
copy 8.6 ms per layer) 107.5 ms, 1.72x its 185.3 ms.

Plain numbers only (no torch): the rates are measured elsewhere (``memory.host_rate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memory.lane_schedule import BOUNDARY_S, StepUnit, simulate
from memory.plan import HostLane, Plan

HostCompute = str | int  # "auto" | "off" | a forced number of host layers
HOST_KV_ITEMSIZE = 4  # the host layers' KV cache is fp32 (engine.host_lane.HostOps: fp32 attention)
SEARCHED_COUNTS = 3  # host-layer counts (the best spread ones) whose placement is then improved
MAX_TRIES = 240  # simulated layouts per improved count (the 7B plans converged within 108)


def parse_host_compute(text: str | int) -> HostCompute:
    """``--host-compute``: ``auto``, ``off`` or a number of layers >= 0; ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        word = str(text).strip().lower()
        if word in ("auto", "off"):
            return word
        if not word.isdigit():
            raise ValueError(f"--host-compute must be auto, off or a number of layers >= 0, got {text!r}")
        value = int(word)
    if value < 0:
        raise ValueError(f"--host-compute must be auto, off or a number of layers >= 0, got {value}")
    return value


@dataclass(frozen=True)
class LaneTimes:
    """Predicted seconds per decode step: each lane's busy time and the step they make together."""

    copy_s: float  # the copy engine's slot copies (streamed layers, lm_head chunks)
    host_s: float  # host layers computed on the CPU
    gpu_s: float  # the GPU's own compute (weights it reads / HBM bandwidth)
    step_s: float  # the step, simulated unit by unit (memory.lane_schedule)


@dataclass(frozen=True)
class HostChoice:
    """The host layers of a decode step and the lanes' predicted times."""

    layers: tuple[int, ...]
    times: LaneTimes
    reason: str  # why this many, for the plan's notes
    stream_s: float = 0.0  # the step with no host layer (every candidate streamed)


def spread_host(candidates: tuple[int, ...], h: int) -> tuple[int, ...]:
    """``h`` of the candidate layers (execution order), evenly spaced and centred, so streamed
    candidates sit between host ones (the copy of one runs while the CPU computes another)."""
    n = len(candidates)
    assert 0 <= h <= n, (h, n)
    return tuple(candidates[(2 * j + 1) * n // (2 * h)] for j in range(h)) if h else ()


@dataclass(frozen=True)
class LaneInputs:
    """What the choice needs, in bytes and GB/s (10**9 bytes/s)."""

    candidates: tuple[int, ...]  # streamed layers pinned in host memory, execution order
    layer_bytes: tuple[int, ...]  # every layer's bytes (indexed by layer)
    copy_other: int  # bytes crossing per step besides layers and lm_head chunks (embedding rows)
    streamed: tuple[int, ...]  # every streamed layer
    gpu_other: int  # bytes the GPU reads per step besides the layers (lm_head, norm)
    h2d_gbps: float
    hbm_gbps: float
    host_gbps: float | None  # the CPU's GEMV rate at this batch; None: not known
    head_chunks: tuple[int, ...] = ()  # bytes of each streamed lm_head chunk, in order (empty: resident)
    slots: int = 2  # staging slots
    host_extra_s: float = 0.0  # a host layer's seconds beyond its bytes at host_gbps (norms, attention, Python)
    max_layers: int | None = None  # host layers whose KV cache and converted weights the RAM left holds (None: any)


def step_units(x: LaneInputs, host: tuple[int, ...]) -> list[StepUnit]:
    """A decode step's units in execution order with ``host`` on the CPU (an unknown host rate
    counts the host layers as free)."""
    h2d, hbm, on_host, streamed = x.h2d_gbps * 1e9, x.hbm_gbps * 1e9, set(host), set(x.streamed)
    units = []
    for i, b in enumerate(x.layer_bytes):
        if i in on_host:
            units.append(StepUnit("host", host_s=b / (x.host_gbps * 1e9) + x.host_extra_s if x.host_gbps else 0.0))
        elif i in streamed:
            units.append(StepUnit("streamed", copy_s=b / h2d, gpu_s=b / hbm))
        else:
            units.append(StepUnit("resident", gpu_s=b / hbm))
    if not x.head_chunks:
        return units + [StepUnit("resident", gpu_s=x.gpu_other / hbm)]
    share = x.gpu_other / sum(x.head_chunks)  # the GPU reads each chunk (and the norm, spread over them)
    return units + [StepUnit("streamed", copy_s=c / h2d, gpu_s=c * share / hbm) for c in x.head_chunks]


def lane_times(x: LaneInputs, host: tuple[int, ...]) -> LaneTimes:
    """The lanes' times with ``host`` computed on the CPU and every other streamed layer copied."""
    units = step_units(x, host)
    rows = x.copy_other / (x.h2d_gbps * 1e9)  # the embedding rows cross between steps, on the compute stream
    sim = simulate(units, x.slots, boundary_s=BOUNDARY_S + rows)
    return LaneTimes(sim.copy_busy_s, sim.host_busy_s, sim.gpu_busy_s, sim.step_s)


def improve(x: LaneInputs, host: tuple[int, ...], times: LaneTimes) -> tuple[tuple[int, ...], LaneTimes]:
    """Move host layers one candidate left or right, the best move at a time, while the simulated step
    shrinks (at most ``MAX_TRIES`` layouts simulated): where a copy and a host layer wait for each other
    depends on the order."""
    pos, tries = {c: k for k, c in enumerate(x.candidates)}, 0
    while tries < MAX_TRIES:
        start = host
        for j, layer in enumerate(start):
            for k in (pos[layer] - 1, pos[layer] + 1):
                if 0 <= k < len(x.candidates) and x.candidates[k] not in start and tries < MAX_TRIES:
                    moved = tuple(sorted((*start[:j], x.candidates[k], *start[j + 1:])))
                    t, tries = lane_times(x, moved), tries + 1
                    if t.step_s < times.step_s * (1 - 1e-9):  # the best move from ``start``
                        host, times = moved, t
        if host == start:
            break
    return host, times


def choose_host_layers(x: LaneInputs, mode: HostCompute) -> HostChoice:
    """The host layers for ``mode``: none (``off``), the fastest predicted set (``auto``; ties go
    to fewer host layers) or exactly ``mode`` layers (ValueError when fewer are candidates)."""
    stream = lane_times(x, ())
    return dataclasses.replace(_choose(x, mode, HostChoice((), stream, "")), stream_s=stream.step_s)


def _choose(x: LaneInputs, mode: HostCompute, none: HostChoice) -> HostChoice:
    """choose_host_layers given ``none``, the choice of no host layer."""
    if mode == "off" or mode == 0:
        return none
    room = len(x.candidates) if x.max_layers is None else min(x.max_layers, len(x.candidates))
    if isinstance(mode, int):
        if mode > len(x.candidates):
            raise ValueError(f"--host-compute {mode}: only {len(x.candidates)} layers stream from pinned host "
                             "memory in this plan (host layers are chosen among them); give at most "
                             f"{len(x.candidates)}, auto or off, or lower --vram-budget")
        if mode > room:
            raise ValueError(f"--host-compute {mode}: the host KV cache of {mode} host layers does not fit the RAM "
                             f"left beside the pinned layers (with their converted weights: room for {room}); give at "
                             f"most {room}, auto or off, or lower --max-context or --batch")
        host = spread_host(x.candidates, mode)
        known = "" if x.host_gbps else "; the host's GEMV rate is not measured: its lane time is not predicted"
        why = f"host lane: {mode} host layers forced (--host-compute {mode}){known}"
        return HostChoice(host, lane_times(x, host), why)
    if x.host_gbps is None or not x.candidates:
        why = "no streamed layer is pinned in host memory" if x.host_gbps else "the host's GEMV rate is not known"
        return HostChoice((), none.times, f"host lane unused: {why}")
    if room == 0:
        return HostChoice((), none.times, "host lane unused: the RAM left beside the pinned layers does not hold one "
                          "host layer's KV cache and converted weights (lower --max-context or --batch to use it)")
    spread = {h: spread_host(x.candidates, h) for h in range(1, room + 1)}
    timed = {h: lane_times(x, host) for h, host in spread.items()}
    best = none
    for h in sorted(sorted(timed, key=lambda h: (timed[h].step_s, h))[:SEARCHED_COUNTS]):
        host, times = improve(x, spread[h], timed[h])
        if times.step_s < best.times.step_s * (1 - 1e-9):
            best = HostChoice(host, times, "")
    if not best.layers:
        return HostChoice((), none.times, f"host lane unused: at {x.host_gbps:.1f} GB/s on the host no split "
                          "beats streaming every layer")
    why = f"host lane: {len(best.layers)} host layers minimise the simulated step"
    extra = f" + {x.host_extra_s * 1e3:.2f} ms a layer" if x.host_extra_s else ""
    return HostChoice(best.layers, best.times, f"{why} (host {x.host_gbps:.1f} GB/s{extra}, H2D {x.h2d_gbps:.1f} GB/s)")


def host_lane(x: LaneInputs, mode: HostCompute, source: str, kv_per_layer: int, notes: list[str],
              held_per_layer: int = 0) -> HostLane:
    """The plan's :class:`memory.plan.HostLane` for ``mode`` (its reason goes to ``notes``);
    ``kv_per_layer``: one layer's KV cache at the plan's batch and context; ``held_per_layer``: the host
    bytes one host layer's converted weights take beside its pinned copy."""
    c = choose_host_layers(x, mode)
    if c.reason:
        notes.append(c.reason)
    return HostLane(str(mode), c.layers, x.host_gbps, source, c.times.copy_s, c.times.host_s, c.times.gpu_s,
                    len(c.layers) * kv_per_layer, c.times.step_s, x.host_extra_s, c.stream_s, inputs=x,
                    held_bytes=len(c.layers) * held_per_layer)


def replan(plan: Plan, host_gbps: float) -> Plan | None:
    """``plan`` with its host lane chosen again among its own host layers at ``host_gbps``, a rate the lane
    achieved in this run (its norms, attention and Python included, so no extra is added): the layers that still
    beat streaming, or None where none does (or the plan keeps no planner inputs). Used mid-run by
    ``engine.lane_guard`` when decode steps lose to streaming: a host slower than planned may still win with
    fewer host layers (the copy engine takes the others back)."""
    lane = plan.host_lane
    if lane is None or lane.inputs is None or not lane.layers or not host_gbps > 0:
        return None
    x = dataclasses.replace(lane.inputs, candidates=lane.layers, host_gbps=host_gbps, host_extra_s=0.0,
                            max_layers=None)
    choice = choose_host_layers(x, "auto")
    return narrow(plan, choice.layers, host_gbps) if choice.layers else None


def without_lane(plan: Plan) -> Plan:
    """``plan`` after its host lane is retired mid-run: every host layer streams again (its bytes cross each step,
    its module says so) and the step is the plan's step without host layers."""
    lane = plan.host_lane
    assert lane is not None
    sizes = lane.inputs.layer_bytes if lane.inputs is not None else None
    back = sum(sizes[i] if sizes is not None else plan.layer_bytes for i in lane.layers)
    step = lane.stream_step_s or plan.predicted_step_s
    return dataclasses.replace(plan, host_lane=None, modules=_streamed_again(plan, set(lane.layers)),
                               predicted_step_s=step, predicted_tok_s=plan.batch / step, step_bound="pcie",
                               streamed_bytes_per_step=plan.streamed_bytes_per_step + back)


def _streamed_again(plan: Plan, layers: set[int]):
    """``plan``'s modules with ``layers`` placed ``streamed`` again (the lane gave them back)."""
    return tuple(dataclasses.replace(m, placement="streamed", reason="streamed: the host lane gave it back mid-run "
                                     "(engine.lane_guard)")
                 if m.kind == "layer" and int(m.name.split(".")[1]) in layers else m for m in plan.modules)


def narrow(plan: Plan, layers: tuple[int, ...], host_gbps: float) -> Plan:
    """``plan`` with only ``layers`` (some of its host layers) computed on the host at ``host_gbps`` (an achieved
    rate); the others stream again: their bytes cross each step, their modules say so, the step is simulated
    anew (``stream_step_s`` stays the plan's step without host layers)."""
    lane = plan.host_lane
    assert lane is not None and lane.inputs is not None and set(layers) <= set(lane.layers), (layers, lane)
    x = dataclasses.replace(lane.inputs, host_gbps=host_gbps, host_extra_s=0.0)
    t = lane_times(x, layers)
    back = set(lane.layers) - set(layers)
    kv, held = (b // len(lane.layers) * len(layers) for b in (lane.kv_bytes, lane.held_bytes))
    new = dataclasses.replace(lane, layers=layers, host_gbps=host_gbps, host_source="achieved by the host lane in "
                              "this run", copy_s=t.copy_s, host_s=t.host_s, gpu_s=t.gpu_s, kv_bytes=kv, step_s=t.step_s,
                              host_extra_s=0.0, held_bytes=held)
    return dataclasses.replace(plan, host_lane=new, modules=_streamed_again(plan, back), predicted_step_s=t.step_s,
                               predicted_tok_s=plan.batch / t.step_s,
                               step_bound="pcie" if t.copy_s >= t.host_s + t.gpu_s else "host",
                               streamed_bytes_per_step=plan.streamed_bytes_per_step
                               + sum(x.layer_bytes[i] for i in back))
