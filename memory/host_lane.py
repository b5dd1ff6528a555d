"""The host compute lane: which non-resident layers a decode step computes on the CPU.

At small batch a streamed layer is bound by PCIe, while the CPU can read the same bytes from
host memory at its own bandwidth. With ``h`` layers computed on the host and ``s`` streamed,
the copy engine moves the ``s`` layers (and lm_head chunks, embedding rows) while the CPU
computes the ``h`` ones; a host layer's output is the next layer's input, so the host lane
and the GPU's own compute follow each other, and the copy lane runs beside both:

    step ~= max(copy lane, host lane + GPU compute)

With no host layer this is the planner's usual ``max(pcie, hbm)``. Only layers pinned in host
memory are candidates (the CPU must not read the disk tier), and they are chosen spread evenly
among the streamed ones, so that a streamed layer's copy runs while the CPU works on the host
layer before it. A prefill always streams every non-resident layer (host layers included).

Plain numbers only (no torch): the rates are measured elsewhere (``memory.host_rate``).
"""

from __future__ import annotations

from dataclasses import dataclass

from memory.plan import HostLane

HostCompute = str | int  # "auto" | "off" | a forced number of host layers


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
    """Predicted seconds per decode step of each lane, and the step they make."""

    copy_s: float  # host -> device copies (streamed layers, lm_head chunks, embedding rows)
    host_s: float  # host layers computed on the CPU
    gpu_s: float  # the GPU's own compute (weights it reads / HBM bandwidth)

    @property
    def step_s(self) -> float:
        return max(self.copy_s, self.host_s + self.gpu_s)


@dataclass(frozen=True)
class HostChoice:
    """The host layers of a decode step and the lanes' predicted times."""

    layers: tuple[int, ...]
    times: LaneTimes
    reason: str  # why this many, for the plan's notes


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
    copy_other: int  # bytes crossing per step besides the streamed layers (lm_head chunks, embedding rows)
    streamed: tuple[int, ...]  # every streamed layer
    gpu_other: int  # bytes the GPU reads per step besides the layers it computes (lm_head, norm)
    h2d_gbps: float
    hbm_gbps: float
    host_gbps: float | None  # the CPU's GEMV rate at this batch; None: not known


def lane_times(x: LaneInputs, host: tuple[int, ...]) -> LaneTimes:
    """The lanes' times with ``host`` computed on the CPU and every other streamed layer copied."""
    on_host = set(host)
    copied = sum(x.layer_bytes[i] for i in x.streamed if i not in on_host) + x.copy_other
    gpu = sum(b for i, b in enumerate(x.layer_bytes) if i not in on_host) + x.gpu_other
    host_bytes = sum(x.layer_bytes[i] for i in host)
    host_s = host_bytes / (x.host_gbps * 1e9) if host and x.host_gbps else 0.0
    return LaneTimes(copied / (x.h2d_gbps * 1e9), host_s, gpu / (x.hbm_gbps * 1e9))


def choose_host_layers(x: LaneInputs, mode: HostCompute) -> HostChoice:
    """The host layers for ``mode``: none (``off``), the fastest predicted count (``auto``; ties go
    to fewer host layers) or exactly ``mode`` layers (ValueError when fewer are candidates)."""
    none = HostChoice((), lane_times(x, ()), "")
    if mode == "off" or mode == 0:
        return none
    if isinstance(mode, int):
        if mode > len(x.candidates):
            raise ValueError(f"--host-compute {mode}: only {len(x.candidates)} layers stream from pinned host "
                             "memory in this plan (host layers are chosen among them); give at most "
                             f"{len(x.candidates)}, auto or off, or lower --vram-budget")
        host = spread_host(x.candidates, mode)
        known = "" if x.host_gbps else "; the host's GEMV rate is not measured: its lane time is not predicted"
        why = f"host lane: {mode} host layers forced (--host-compute {mode}){known}"
        return HostChoice(host, lane_times(x, host), why)
    if x.host_gbps is None or not x.candidates:
        why = "no streamed layer is pinned in host memory" if x.host_gbps else "the host's GEMV rate is not known"
        return HostChoice((), none.times, f"host lane unused: {why}")
    best = none
    for h in range(1, len(x.candidates) + 1):
        host = spread_host(x.candidates, h)
        times = lane_times(x, host)
        if times.step_s < best.times.step_s:
            best = HostChoice(host, times, "")
    if not best.layers:
        return HostChoice((), none.times, f"host lane unused: at {x.host_gbps:.1f} GB/s on the host no split "
                          "beats streaming every layer")
    why = f"host lane: {len(best.layers)} host layers minimise the predicted step"
    return HostChoice(best.layers, best.times, f"{why} (host {x.host_gbps:.1f} GB/s, H2D {x.h2d_gbps:.1f} GB/s)")


def host_lane(x: LaneInputs, mode: HostCompute, source: str, kv_per_layer: int, notes: list[str]) -> HostLane:
    """The plan's :class:`memory.plan.HostLane` for ``mode`` (its reason goes to ``notes``);
    ``kv_per_layer``: one layer's KV cache at the plan's batch and context."""
    c = choose_host_layers(x, mode)
    if c.reason:
        notes.append(c.reason)
    return HostLane(str(mode), c.layers, x.host_gbps, source, c.times.copy_s, c.times.host_s, c.times.gpu_s,
                    len(c.layers) * kv_per_layer)
