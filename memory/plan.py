"""The memory plan: what lives where, what it costs, and how fast a decode step should be.

Built by :func:`memory.planner.make_plan`; this module holds the frozen result types and their
renderings (:meth:`Plan.table` for people, :meth:`Plan.to_dict` for JSON).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from memory.footprint import ALLOCATOR_ALLOWANCE
from memory.units import format_size

if TYPE_CHECKING:
    from memory.host_lane import LaneInputs

__all__ = ["ALLOCATOR_ALLOWANCE", "HostLane", "ModulePlan", "Plan"]

Placement = Literal["resident", "streamed", "host"]
Tier = Literal["vram", "pinned", "disk"]


@dataclass(frozen=True)
class ModulePlan:
    """One module's decision.

    ``bytes`` is its size as the kernels read it (what occupies VRAM when resident, or crosses
    PCIe each step when streamed); ``placement`` says where it runs from: ``resident`` (in VRAM
    for the whole run), ``streamed`` (copied into a staging slot every step) or ``host`` (the
    embedding table kept in host memory: only the looked-up rows travel; a layer computed on the
    CPU in a decode step, streamed in a prefill). ``tier`` is where its
    bytes live: ``vram``, ``pinned`` host memory, or ``disk`` (the memory-mapped checkpoint).
    """

    name: str  # "embed_tokens", "layers.0", ..., "norm", "lm_head"
    kind: Literal["embedding", "layer", "norm", "lm_head"]
    bytes: int
    placement: Placement
    tier: Tier
    reason: str


@dataclass(frozen=True)
class HostLane:
    """The decode step's host compute lane (``memory.host_lane``): layers computed on the CPU and the
    predicted seconds per step of each lane."""

    mode: str  # "auto" or the forced number of layers
    layers: tuple[int, ...]  # computed on the CPU in a decode step (streamed in a prefill)
    host_gbps: float | None  # the CPU's GEMV rate at the plan's batch
    host_source: str
    copy_s: float  # the copy engine's time per decode step
    host_s: float  # the CPU's time per decode step
    gpu_s: float  # the GPU's own compute per decode step
    kv_bytes: int  # the host layers' KV cache, in host memory
    step_s: float  # the decode step the lanes make together (simulated: memory.lane_schedule)
    host_extra_s: float = 0.0  # a host layer's seconds beyond its bytes at host_gbps (norms, attention, Python)
    stream_step_s: float = 0.0  # the simulated step with these residencies and no host layer (every candidate streamed)
    inputs: LaneInputs | None = field(default=None, compare=False, repr=False)  # what chose it (a re-plan mid-run)
    held_bytes: int = 0  # the host layers' converted weights beside their pinned copies (engine.host_forms)

    def summary(self) -> str:
        """One line for the plan table."""
        extra = f" + {self.host_extra_s * 1e3:.2f} ms a layer" if self.host_extra_s else ""
        host = (f"host {self.host_s * 1e3:.1f} ms ({self.host_gbps:.1f} GB/s{extra}, {self.host_source})"
                if self.host_gbps else f"host time not predicted (GEMV rate {self.host_source})")
        which = ", ".join(map(str, self.layers)) if self.layers else "none"
        return (f"host lane ({self.mode}): layers {which}; per decode step copy {self.copy_s * 1e3:.1f} ms, "
                f"{host}, GPU {self.gpu_s * 1e3:.1f} ms, together {self.step_s * 1e3:.1f} ms; "
                f"host KV {format_size(self.kv_bytes)}"
                + (f", converted weights {format_size(self.held_bytes)}" if self.held_bytes else ""))


@dataclass(frozen=True)
class Plan:
    """A VRAM/host memory plan for one model, budget and workload (all sizes in bytes)."""

    modules: tuple[ModulePlan, ...]
    resident_layers: tuple[int, ...]
    streamed_layers: tuple[int, ...]
    disk_layers: tuple[int, ...]  # streamed layers read from the mmap'd file (not pinned)
    embed_on_device: bool
    lm_head_resident: bool
    lm_head_chunks: int  # 0 when resident; else vocab-row chunks, each <= slot_bytes
    num_slots: int  # staging slots; 0 when no layer or lm_head streams
    slot_bytes: int
    layer_bytes: int  # the largest packed decoder layer (one staging slot)
    resident_weight_bytes: int
    staging_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    prefill_state_bytes: int  # part of workspace_bytes: other chunks' prompt states in VRAM (layer-major prefill)
    total_bytes: int  # resident_weight + staging + kv_cache + workspace
    budget_bytes: int  # the VRAM budget actually planned for (after clamping)
    outside_bytes: int  # the process's GPU memory outside torch's allocator (CUDA context, kernels)
    streamed_bytes_per_step: int  # host -> device bytes per decode step
    disk_bytes_per_step: int  # bytes read from the checkpoint files per decode step
    host_pinned_bytes: int
    host_budget_bytes: int
    predicted_step_s: float
    predicted_tok_s: float
    step_bound: str  # what limits the step: "pcie", "hbm" or "disk"
    h2d_gbps: float
    h2d_source: str
    dtype: str
    batch: int
    max_context: int
    prefill_chunk: int
    notes: tuple[str, ...]
    host_lane: HostLane | None = None  # None: --host-compute off (every non-resident layer streams)
    prefill_state_place: Literal["vram", "host"] = "vram"  # where the prompt states wait between layers
    prefill_state_host_bytes: int = 0  # host memory holding them (host placement; part of host_pinned_bytes)
    scratch_bytes: int = 0  # part of workspace_bytes: a prefill's dense tile of packed layers (the ops use it)
    # host RAM besides the pinned tier, set by the engine (engine.host_ram), counted by its preflight:
    host_table_bytes: int = 0  # an embedding table kept in host memory outside the file map (GGUF blocks widened)
    load_bounce_bytes: int = 0  # pinned bounce buffers of the resident layers' upload, held only while they load
    convert_bytes: int = 0  # one loading thread's working set converting a layer (each further thread: as much)
    convert_what: str = ""  # that conversion, in words

    @property
    def host_layers(self) -> tuple[int, ...]:
        """Layers a decode step computes on the CPU (a prefill streams them)."""
        return self.host_lane.layers if self.host_lane is not None else ()

    def __post_init__(self) -> None:
        parts = self.resident_weight_bytes + self.staging_bytes + self.kv_cache_bytes + self.workspace_bytes
        assert parts == self.total_bytes, "plan categories must sum to the total"
        assert self.total_bytes + self.outside_bytes <= self.budget_bytes, "a plan never exceeds its budget"
        assert set(self.disk_layers) <= set(self.streamed_layers)
        assert not set(self.resident_layers) & set(self.streamed_layers)
        assert (self.num_slots == 0) == (not self.streamed_layers and self.lm_head_resident)
        assert set(self.host_layers) <= set(self.streamed_layers) - set(self.disk_layers)

    def _tile(self) -> str:
        return f" a {format_size(self.scratch_bytes)} dense tile of packed layers," if self.scratch_bytes else ""

    def module(self, name: str) -> ModulePlan:
        """The decision for module ``name`` (e.g. ``"layers.3"``, ``"lm_head"``)."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"no module {name!r} in the plan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (tuples become lists; not the host lane's planner inputs)."""
        d = dataclasses.asdict(self)
        if d.get("host_lane"):
            d["host_lane"].pop("inputs", None)
        return d

    def table(self) -> str:
        """A readable table of the decisions (consecutive alike layers grouped) and a summary."""
        rows = [("module", "placement", "tier", "bytes", "reason")]
        rows += [(name, m.placement, m.tier, format_size(size), m.reason)
                 for name, m, size in _grouped(self.modules)]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * min(120, len(lines[0]) + 20))
        return "\n".join(lines + [""] + self.summary_lines())

    @property
    def allocator_bytes(self) -> int:
        """What torch's caching allocator may hold: the budget less the memory outside it."""
        return self.budget_bytes - self.outside_bytes

    def _states_line(self) -> str:
        head = (f"prompt states    : {format_size(self.prefill_state_bytes)} (layer-major prefill: each layer is "
                f"brought in once and serves every chunk; the hidden states of up to {self.batch} x "
                f"{self.max_context - 1} prompt tokens wait ")
        if self.prefill_state_place == "vram":
            return head + "in VRAM between layers)"
        return head + (f"in pinned host memory between layers, {format_size(self.prefill_state_host_bytes)}; "
                       "on the GPU only two chunks' states, copied in and out on the copy stream)")

    def _host_other(self) -> list[str]:
        """The host RAM line for what the engine holds besides the pinned tier (none when there is nothing)."""
        parts = [f"{format_size(self.host_table_bytes)} embedding table (GGUF blocks widened)"] \
            if self.host_table_bytes else []
        if self.host_lane is not None and self.host_lane.held_bytes:
            parts.append(f"{format_size(self.host_lane.held_bytes)} of the host layers' converted weights")
        if self.load_bounce_bytes:
            parts.append(f"while loading {format_size(self.load_bounce_bytes)} of pinned upload bounce buffers")
        if self.convert_bytes:
            parts.append(f"{format_size(self.convert_bytes)} a thread converting layers ({self.convert_what})")
        return [f"host RAM besides : {'; '.join(parts)}"] if parts else []

    def summary_lines(self) -> list[str]:
        """The summary part of :meth:`table`: byte accounting, prediction and notes."""
        pct = 100.0 * (self.total_bytes + self.outside_bytes) / self.budget_bytes if self.budget_bytes else 0.0
        slots = (f"{self.num_slots} x {format_size(self.slot_bytes)} = {format_size(self.staging_bytes)}"
                 if self.num_slots else "none")
        head = "" if self.lm_head_resident else f", lm_head in {self.lm_head_chunks} chunks"
        rows = "" if self.embed_on_device else ", embedding rows"
        out = [
            f"resident weights : {format_size(self.resident_weight_bytes)} ({len(self.resident_layers)} layers"
            f"{', lm_head' if self.lm_head_resident else ''}{', embed_tokens' if self.embed_on_device else ''})",
            f"streamed / step  : {format_size(self.streamed_bytes_per_step)} "
            f"({len(self.streamed_layers) - len(self.host_layers)} layers"
            f"{head}{rows}; {len(self.disk_layers)} layers from disk)",
            f"staging slots    : {slots}",
            f"KV cache         : {format_size(self.kv_cache_bytes)} "
            f"(batch {self.batch}, context {self.max_context}, {self.dtype})",
            f"workspace        : {format_size(self.workspace_bytes)} (one {self.prefill_chunk}-token prefill chunk's "
            f"activations, the prompt states below, logits, rope tables,{self._tile()} allocator slack)",
            self._states_line(),
            *([f"CUDA context and kernels: {format_size(self.outside_bytes)} (outside torch's allocator)"]
              if self.outside_bytes else []),
            f"total VRAM       : {format_size(self.total_bytes + self.outside_bytes)} of "
            f"{format_size(self.budget_bytes)} budget ({pct:.1f}%)",
            f"host pinned      : {format_size(self.host_pinned_bytes)} of {format_size(self.host_budget_bytes)} "
            "host budget",
            *self._host_other(),
            f"predicted        : {self.predicted_step_s * 1e3:.1f} ms/step, {self.predicted_tok_s:.2f} tok/s "
            f"(bound: {self.step_bound}; H2D {self.h2d_gbps:.1f} GB/s, {self.h2d_source})",
            *([self.host_lane.summary()] if self.host_lane is not None else []),
        ]
        return out + [f"note: {n}" for n in self.notes]


def _grouped(modules: tuple[ModulePlan, ...]) -> list[tuple[str, ModulePlan, int]]:
    """Merge runs of consecutive layers with the same placement/tier/reason into one row."""
    out: list[tuple[str, ModulePlan, int]] = []
    run: list[ModulePlan] = []

    def flush() -> None:
        if run:
            first, last = run[0].name.split(".")[1], run[-1].name.split(".")[1]
            name = run[0].name if len(run) == 1 else f"layers.{first}-{last} (x{len(run)})"
            out.append((name, run[0], sum(m.bytes for m in run)))
            run.clear()

    for m in modules:
        key = (m.placement, m.tier, m.reason)
        same = run and m.kind == "layer" and key == (run[0].placement, run[0].tier, run[0].reason)
        if m.kind == "layer" and (not run or same):
            run.append(m)
            continue
        flush()
        if m.kind == "layer":
            run.append(m)
        else:
            out.append((m.name, m, m.bytes))
    flush()
    return out
