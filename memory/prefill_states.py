"""Where a layer-major prefill keeps the prompt's hidden states between layers, and its chunk.

Part of the planner (``memory.planner`` calls :func:`place_states`); plain numbers only. The states
(hidden and residual) of every prompt token wait between layers while each layer's weights serve all
chunks. Two placements:

* ``vram``: the states of the longest prompts (``batch`` x ``max_context`` tokens) stay on the GPU;
* ``host``: they wait in pinned host memory (off the host budget for pinned layers) and each chunk is
  copied in before a layer runs on it and out after, on the copy stream; only two chunks' states (one
  copied in, one copied out) are on the GPU besides the chunk computing.

``auto`` keeps them in VRAM unless that costs something ``host`` does not: it picks ``host`` when in
VRAM the plan would not fit the budget or would need a smaller prefill chunk, and ``host`` reads no
more bytes from disk (its host memory comes off the pins). Keeping fewer weight bytes resident is not
reason enough on its own: the host placement's GPU side (copies in flight next to the computing chunk)
has not been measured against the budget on a GPU yet, while the VRAM placement has (16k-token prompts
at 4 / 6 / 12 GB within the budget, bench/results/2026-12-01-h200-budget); ``--prefill-states host``
asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from memory.footprint import Footprint
from memory.placement import Residency, Tiers, assign_tiers, choose_residency
from memory.sizes import Sizes, minimum_bytes, sizes
from memory.units import format_size

PrefillStates = Literal["auto", "vram", "host"]
STATE_MODES: tuple[str, ...] = ("auto", "vram", "host")
MIN_AUTO_CHUNK = 64  # the smallest prefill chunk the planner picks by itself (tokens)


@dataclass(frozen=True)
class StateInputs:
    """The workload as the placement sees it: the chunk asked for, and whether it may be lowered."""

    fp: Footprint
    batch: int
    max_context: int
    chunk: int
    auto_chunk: bool  # the user did not choose the chunk: it may be halved to fit
    host_budget: int  # pinned host memory for streamed layers (and host prompt states)


@dataclass(frozen=True)
class Fit:
    """One placement's plan inputs: the chunk it runs with, its sizes, residency and tiers."""

    place: Literal["vram", "host"]
    chunk: int
    sizes: Sizes
    residency: Residency
    tiers: Tiers
    asked: Sizes | None  # the sizes at the chunk asked for, when that chunk was lowered

    @property
    def resident_bytes(self) -> int:
        s, r = self.sizes, self.residency
        return (sum(b for i, b in enumerate(s.layers) if i not in r.streamed) + (s.embed if r.embed_on_device else 0)
                + (s.lm_head if r.lm_head_resident and not s.tied else 0))

    @property
    def disk_bytes(self) -> int:
        """Bytes a decode step reads from the checkpoint files."""
        s, t = self.sizes, self.tiers
        return sum(s.layer_file[i] for i in t.disk_layers) + (s.lm_head_file if t.lm_head_tier == "disk" else 0)


def smaller_chunk(x: StateInputs, host_states: bool, avail: int) -> int | None:
    """The largest of chunk/2, chunk/4, ... (not below ``MIN_AUTO_CHUNK`` tokens or the batch) whose plan
    fits ``avail``: one chunk's activations shrink with it, the other chunks' prompt states grow a little."""
    c = x.chunk // 2
    while c >= max(MIN_AUTO_CHUNK, x.batch):
        if minimum_bytes(sizes(x.fp, x.batch, x.max_context, c, host_states)) <= avail:
            return c
        c //= 2
    return None


def fit(x: StateInputs, host_states: bool, avail: int) -> Fit | None:
    """The plan inputs with the states in VRAM or on the host, or None when that placement cannot run."""
    chunk, s, asked = x.chunk, sizes(x.fp, x.batch, x.max_context, x.chunk, host_states), None
    if x.auto_chunk and minimum_bytes(s) > avail and (c := smaller_chunk(x, host_states, avail)) is not None:
        chunk, asked, s = c, s, sizes(x.fp, x.batch, x.max_context, c, host_states)
    if minimum_bytes(s) > avail or s.state_host > x.host_budget:
        return None
    r = choose_residency(s, avail)
    return Fit("host" if host_states else "vram", chunk, s, r, assign_tiers(s, r, x.host_budget - s.state_host),
               asked)


def place_states(x: StateInputs, avail: int, outside: int, mode: str, notes: list[str]) -> Fit | None:
    """The placement ``mode`` asks for (``auto``: see the module docstring), with its notes; None when
    it cannot run within ``avail`` bytes of VRAM. ValueError when ``host`` is forced and the host
    budget cannot hold the states."""
    if mode not in STATE_MODES:
        raise ValueError(f"prefill_states must be one of {', '.join(STATE_MODES)}, got {mode!r}")
    vram = fit(x, False, avail) if mode != "host" else None
    host = fit(x, True, avail) if mode != "vram" else None
    if mode == "host" and host is None and (need := x.fp.prefill_state_host_bytes(x.batch, x.max_context)) > \
            x.host_budget:
        raise ValueError(f"the prompt states need {format_size(need)} of host memory, over the host budget "
                         f"{format_size(x.host_budget)}: raise --host-budget or use --prefill-states vram")
    chosen = host if mode == "host" else vram
    if mode == "auto" and host is not None and (why := _vram_costs(vram, host)):
        if vram is None or host.disk_bytes <= vram.disk_bytes:
            chosen = host
            size = f" ({format_size(vram.sizes.state)})" if vram is not None else ""
            notes.append(f"prompt states in host memory ({format_size(host.sizes.state_host)}, off the host budget;"
                         f" {format_size(host.sizes.state)} in flight on the GPU): in VRAM{size} they would {why} "
                         "(--prefill-states vram keeps them on the GPU)")
        else:
            more = format_size(host.disk_bytes - vram.disk_bytes)
            notes.append(f"prompt states stay in VRAM, where they {why}: in host memory they would leave {more} "
                         "more per step to be read from disk (--prefill-states host moves them)")
    if chosen is not None and chosen.asked is not None:
        a = chosen.asked
        notes.append(f"prefill chunk {chosen.chunk} tokens, not {x.chunk}: at {x.chunk} one chunk's activations "
                     f"next to the prompt's other chunks ({format_size(a.state)}) need "
                     f"{format_size(minimum_bytes(a) + outside)}, over the budget (--prefill-chunk sets it)")
    return chosen


def _vram_costs(vram: Fit | None, host: Fit) -> str:
    """What keeping the states in VRAM costs next to ``host`` (empty: nothing), as a verb phrase."""
    if vram is None:
        return "not fit the budget"
    costs = []
    if vram.chunk < host.chunk:
        costs.append(f"need a prefill chunk of {vram.chunk} tokens instead of {host.chunk}")
    return " and ".join(costs)


def _resident(f: Fit) -> str:
    k = len(f.sizes.layers) - len(f.residency.streamed)
    return f"{k} layer{'s' if k != 1 else ''}" + (" + lm_head" if f.residency.lm_head_resident else "")
