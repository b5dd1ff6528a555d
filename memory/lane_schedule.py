"""A decode step with a host lane, unit by unit: when each copy, host layer and GPU layer can run.

The lanes of a decode step are not independent: a layer's input is the previous layer's output,
so the host lane and the GPU's compute form one chain, and the copy engine feeds that chain through
``slots`` staging slots: the copy of streamed unit ``g`` (units counted across steps: the streamer
prefetches the next step's first units) starts once the copy before it is done and unit
``g - slots`` has been computed, which frees its slot. While the chain is in a host layer no slot
is freed, so with two slots the copy engine can run at most two units ahead of the chain; and a step
cannot start before the previous one's lm_head (the next token comes from its logits), so a streamed
lm_head's chunks, copied at the end of a step, are time the host lane cannot use. Summing each
lane's bytes over its rate (``max(copy, host + GPU)``) misses both; :func:`simulate` follows the
dependencies (``memory.host_lane`` states what the traces showed).

Plain numbers only: seconds per unit, given by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Measured in the H200 traces (bench/results/2026-12-01-h200-s7-*, 7B bf16, batch 1 and 4): between a
# GPU layer's end and a host run's start 0.001-0.04 ms (median), between a host run's end and the GPU
# layer after it 0.09-0.11 ms; between the last lm_head chunk's compute and the next step's first
# layer (sampling, the next token's embedding row) 0.52-0.58 ms.
HANDOFF_S = 0.15e-3  # one run of host layers: the state down, the worker woken, the result up
BOUNDARY_S = 0.6e-3  # between two decode steps

Where = Literal["resident", "streamed", "host"]


@dataclass(frozen=True)
class StepUnit:
    """One unit of a decode step, in execution order: a layer or an lm_head chunk."""

    where: Where
    copy_s: float = 0.0  # streamed: its copy into a staging slot
    gpu_s: float = 0.0  # resident or streamed: the GPU's compute
    host_s: float = 0.0  # host: the CPU's compute


@dataclass(frozen=True)
class StepTimes:
    """A simulated steady decode step and what each lane did in it (seconds)."""

    step_s: float
    copy_busy_s: float
    host_busy_s: float
    gpu_busy_s: float


def simulate(units: list[StepUnit], slots: int, handoff_s: float = HANDOFF_S, boundary_s: float = BOUNDARY_S,
             steps: int = 3) -> StepTimes:
    """The steady step of ``units`` repeated: the last of ``steps`` simulated steps (the first one
    starts with empty slots). ``handoff_s`` is added once per run of consecutive host layers."""
    if slots < 1 and any(u.where == "streamed" for u in units):
        raise ValueError(f"streamed units need at least one staging slot, got {slots}")
    if steps < 2:
        raise ValueError(f"simulate at least 2 steps to find a steady one, got {steps}")
    # per unit: (kind, seconds); kind 0 resident, 1 streamed (copy seconds in ``copies``), 2 host, 3 host after host
    plan, copies, prev = [], [], ""
    for u in units:
        if u.where == "streamed":
            plan.append((1, u.gpu_s))
            copies.append(u.copy_s)
        elif u.where == "host":
            plan.append((3 if prev == "host" else 2, u.host_s))
        else:
            plan.append((0, u.gpu_s))
        prev = u.where
    copy_end = 0.0  # the copy engine is free from then on
    freed: list[float] = []  # when streamed unit g (counted across steps) has been computed: its slot is free
    t, ends = 0.0, []
    for _ in range(steps):
        for kind, sec in plan:
            if kind == 1:  # copies run in order, each once its slot is free; the compute waits for its copy
                g = len(freed)
                copy_end = max(copy_end, freed[g - slots] if g >= slots else 0.0) + copies[g % len(copies)]
                t = max(t, copy_end) + sec
                freed.append(t)
            else:
                t += sec + (handoff_s if kind == 2 else 0.0)
        ends.append(t)
        t += boundary_s
    return StepTimes(ends[-1] - ends[-2], sum(copies), sum(u.host_s for u in units), sum(u.gpu_s for u in units))
