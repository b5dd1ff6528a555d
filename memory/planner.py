"""The VRAM-budget planner: which modules stay resident, which stream, and from where.

The planner sees a model only as a :class:`memory.footprint.Footprint` (module sizes and per-token
costs, built by ``engine.footprint``). Rules (all sizes as the kernels read them unless noted):

* Fixed costs come first: KV cache, workspace, the final norm, and two staging slots of one
  packed layer each when anything must stream (lm_head chunks reuse the same slots).
* If the whole model fits, everything is resident and nothing streams (no slots).
* Otherwise the embedding stays in host memory (only the ``batch`` looked-up rows travel)
  unless it is tied to a resident lm_head (one GPU copy serves both). If all layers and
  lm_head fit but the embedding does not, nothing streams but the embedding rows (no slots).
* The rest of the budget holds as many resident bytes as possible (each resident byte is a
  byte not streamed per step): the better of "lm_head resident + k layers" and "k' layers,
  lm_head streamed"; on a tie lm_head wins (no chunking). Streamed layers are spread evenly
  between the resident ones, starting with layer 0: a slot freed by a streamed layer is refilled
  while the resident layers after it compute, so in a prefill, where a layer computes for
  milliseconds, the copy engine does not wait behind a long resident run (with the resident
  layers first it idled through the whole prefix once both slots were full).
* A third slot costs a resident layer, so it is taken only from room left over once residency
  is maximal; as a slot is one packed layer, that happens only when every layer is resident and
  the streamed lm_head does not fit.
* Streamed modules are pinned in execution order within the host budget; the first that
  does not fit and everything after it are read from the memory-mapped checkpoint ("disk"):
  the last streamed layers go to disk first.
* A layer-major prefill's prompt states wait between layers in VRAM, or in pinned host memory when in
  VRAM they would cost resident layers or prefill chunk size (``memory.prefill_states``); the chunk is
  halved to fit only when the user did not choose it.
* With ``host_compute`` other than ``off``, some pinned streamed layers are computed on the CPU in
  a decode step (placement ``host``; a prefill still streams them): see ``memory.host_lane``. Under
  ``auto`` with a known host rate the other lm_head choice (resident or streamed, with as many
  resident layers as then fit) is planned too, and the one with the shorter simulated step is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from memory.budgets import check_workload, resolve_budget, resolve_host_budget
from memory.footprint import ALLOCATOR_ALLOWANCE, Footprint
from memory.host_lane import HOST_KV_ITEMSIZE, HostCompute, LaneInputs, host_lane
from memory.placement import Residency, Tiers, assign_tiers, module_plans, other_head_residency
from memory.plan import HostLane, ModulePlan, Plan
from memory.prefill_states import MIN_AUTO_CHUNK, Fit, StateInputs, place_states
from memory.sizes import Sizes, all_resident_bytes, minimum_bytes, sizes
from memory.units import format_size

log = logging.getLogger(__name__)

__all__ = ["make_plan", "minimum_budget", "Plan", "ModulePlan", "HBM_GBPS", "MIN_AUTO_CHUNK"]

HBM_GBPS = 2500.0  # decode-step estimate when nothing streams: weights / 2.5 TB/s


@dataclass(frozen=True)
class _Workload:
    batch: int
    max_context: int
    prefill_chunk: int
    h2d_gbps: float
    h2d_source: str
    disk_gbps: float | None
    hbm_gbps: float
    host_compute: HostCompute = "off"
    host_gbps: float | None = None  # the CPU's GEMV rate at this batch
    host_source: str = ""
    host_extra_s: float = 0.0  # a host layer's seconds beyond its projections (norms, attention, Python)
    host_ram: int | None = None  # RAM the host lane's KV cache and converted weights may take (None: not limited)
    host_held: int = 0  # host bytes a host layer's converted weights take beside its pinned copy


def minimum_budget(fp: Footprint, *, batch: int = 1, max_context: int = 4096, prefill_chunk: int = 2048,
                   host_states: bool = False) -> int:
    """The smallest VRAM budget that can run: KV + workspace + norm + two staging slots
    (or the whole model resident, if that is smaller); ``host_states``: with the prefill's prompt states
    in host memory (what ``prefill_states="auto"`` falls back to below the in-VRAM figure)."""
    check_workload(batch, max_context, prefill_chunk)
    return minimum_bytes(sizes(fp, batch, max_context, prefill_chunk, host_states))


def _predict(s: Sizes, streamed: int, disk: int, w: _Workload, notes: list[str],
             lane: HostLane | None = None) -> tuple[float, str]:
    """(step seconds, bound): copies, disk reads and compute overlap, so the slowest one sets the pace;
    with host layers the host lane and the GPU's compute run one after the other, beside the copies."""
    weights_read = sum(s.layers) + s.lm_head + s.norm  # every weight is read from HBM once per step
    times = {"pcie": streamed / (w.h2d_gbps * 1e9), "hbm": weights_read / (w.hbm_gbps * 1e9)}
    if lane is not None and lane.layers:  # the lanes wait for each other: the simulated step, named after the busier
        times = {"pcie" if lane.copy_s >= lane.host_s + lane.gpu_s else "host": lane.step_s}
    if disk and w.disk_gbps:
        times["disk"] = disk / (w.disk_gbps * 1e9)
    elif disk:
        notes.append(f"{format_size(disk)} per step is read from the checkpoint files: the prediction ignores "
                     "disk read time (its speed is not known here), and a step will likely be much slower; raise "
                     "the host budget (--host-budget) to pin more layers")
    bound = max(times, key=times.get)
    if bound == "hbm":
        notes.append(f"step time is an HBM estimate (weights read per step / {w.hbm_gbps / 1e3:.1f} TB/s): "
                     "no layer or lm_head streams")
    return times[bound], bound


def _host_lane(fp: Footprint, s: Sizes, r: Residency, t: Tiers, w: _Workload, copy_other: int,
               notes: list[str]) -> HostLane | None:
    """The decode step's host layers (None when ``host_compute`` is off)."""
    if w.host_compute == "off":
        return None
    head = _head_chunks(fp, s, r)
    x = LaneInputs(candidates=tuple(i for i in r.streamed if i not in t.disk_layers), layer_bytes=s.layers,
                   copy_other=copy_other - sum(head), streamed=r.streamed, gpu_other=s.lm_head + s.norm,
                   h2d_gbps=w.h2d_gbps, hbm_gbps=w.hbm_gbps, host_gbps=w.host_gbps, head_chunks=head,
                   slots=r.num_slots, host_extra_s=w.host_extra_s)
    kv_per_layer = fp.kv_bytes_per_token // max(1, s.n) * w.batch * w.max_context * HOST_KV_ITEMSIZE // fp.dtype_bytes
    if w.host_ram is not None and kv_per_layer + w.host_held > 0:
        x = dataclasses.replace(x, max_layers=max(0, w.host_ram) // (kv_per_layer + w.host_held))
    return host_lane(x, w.host_compute, w.host_source, kv_per_layer, notes, w.host_held)


def head_chunk_count(fp: Footprint, s: Sizes) -> int:
    """Streamed lm_head chunks of as many vocabulary rows as one staging slot holds, at lm_head's own row
    size (a GGUF output held as blocks has smaller rows than the embedding widened for the look-up)."""
    return math.ceil(fp.rows / (s.layer // max(1, s.lm_head // fp.rows)))


def _head_chunks(fp: Footprint, s: Sizes, r: Residency) -> tuple[int, ...]:
    """Bytes of each streamed lm_head chunk (``engine.weights``: equal row counts, the last one short)."""
    if r.lm_head_resident:
        return ()
    chunks = head_chunk_count(fp, s)
    rows = -(-fp.rows // chunks)
    return tuple(s.lm_head * min(rows, fp.rows - c * rows) // fp.rows for c in range(chunks))


def _other_head_if_faster(fp: Footprint, f: Fit, w: _Workload, budget: tuple[int, int], host: int,
                          notes: list[str], plan: Plan) -> Plan:
    """Under ``host_compute="auto"`` with a known host rate, the plan with lm_head's other residency
    (``memory.placement.other_head_residency``) when its simulated step is shorter: the most resident
    bytes are not the fastest step when the host lane can take layers but not a streamed lm_head."""
    if w.host_compute != "auto" or w.host_gbps is None:
        return plan
    r = other_head_residency(f.sizes, budget[0] - budget[1], f.residency)
    if r is None:
        return plan
    alt = _assemble(fp, dataclasses.replace(f, residency=r, tiers=assign_tiers(f.sizes, r, host - f.sizes.state_host)),
                    w, budget, host, list(notes))
    if not alt.predicted_step_s < plan.predicted_step_s * (1 - 1e-9):
        return plan
    k = len(alt.resident_layers)
    why = (f"{k} resident layers with lm_head {'resident' if r.lm_head_resident else 'streamed'}, not "
           f"{len(plan.resident_layers)} with it {'resident' if plan.lm_head_resident else 'streamed'}: with the "
           f"host lane the step is predicted {alt.predicted_step_s * 1e3:.1f} ms instead of "
           f"{plan.predicted_step_s * 1e3:.1f} ms")
    return dataclasses.replace(alt, notes=(*alt.notes, why))


def make_plan(fp: Footprint, *, vram_budget: int | None = None, host_budget: int | None = None, batch: int = 1,
              max_context: int = 4096, prefill_chunk: int = 2048, device_free: int | None = None,
              h2d_gbps: float = 25.0, h2d_source: str = "given", disk_gbps: float | None = None,
              hbm_gbps: float = HBM_GBPS, outside_bytes: int = 0, auto_chunk: bool = False,
              host_compute: HostCompute = "off", host_gbps: float | None = None,
              host_source: str = "given", prefill_states: str = "auto", host_extra_s: float = 0.0,
              host_ram: int | None = None, host_held: int = 0) -> Plan:
    """Plan residency and streaming for a model's footprint (see the module docstring for the rules).

    ``vram_budget`` None uses ``device_free`` (or, with neither, plans everything resident); a
    budget above ``device_free`` is clamped with a note. ``host_budget`` None is the available RAM
    minus max(2 GiB, 10%). ``outside_bytes`` is what the process holds on the GPU outside the
    allocator (CUDA context, kernels); it comes off a budget the user gave (the GPU's free memory
    is measured net of it already). With ``auto_chunk`` (the user did not choose ``prefill_chunk``), a
    budget below :func:`minimum_budget` halves the prefill chunk until the plan fits (not below
    ``MIN_AUTO_CHUNK`` tokens), with a note. ``host_compute`` (``auto``, ``off`` or a number of
    layers) with ``host_gbps`` (the host's GEMV GB/s at this batch) picks layers a decode step
    computes on the CPU (``memory.host_lane``), each taking its bytes at that rate plus ``host_extra_s``
    (the layer's work beyond its projections), no more layers than ``host_ram`` bytes of RAM hold the host KV
    cache and the ``host_held`` bytes of converted weights of (None: not limited); ``off`` plans as if there
    were no host lane.
    ``prefill_states`` (``auto``, ``vram`` or ``host``) places the layer-major prefill's prompt states
    (``memory.prefill_states``; ``auto`` moves them to host memory when VRAM would cost resident layers or
    chunk size). Raises ValueError when the budget is below the minimum or more host layers are forced than
    can be.
    """
    kw = {k: v for k, v in locals().items() if k != "fp"}
    plan = _plan_once(fp, **kw)
    plan = _spare_scratch(fp, plan, lambda bigger: _plan_once(bigger, **kw))
    for note in plan.notes:
        log.info("memory plan: %s", note)
    return plan


def _spare_scratch(fp: Footprint, plan: Plan, replan) -> Plan:
    """The plan with the prefill's dense tile of packed layers (``fp.scratch_bytes``) grown into VRAM it
    leaves unused, up to ``fp.scratch_max_bytes`` (a whole projection at a time: fewer dequantize + GEMM
    launches in a prefill pass), when ``replan`` with the larger tile places every module, slot and
    prompt state as before; else ``plan``. A tile never costs a resident layer: at the 7B AWQ's 6 GiB,
    the 512 MiB tile made 5 layers stream and decode 3.6x slower while its prompt passes gained 20%."""
    spare = plan.budget_bytes - plan.outside_bytes - plan.total_bytes
    # whole MiB, one allocator allowance of the spare left free: grown into all of it, the 7B AWQ's 157 MiB tile
    # at 6 GiB met 72 MiB of reserved but unallocated blocks in a 32-client burst and ran out (session 27)
    grow = min(spare - ALLOCATOR_ALLOWANCE, fp.scratch_max_bytes - fp.scratch_bytes) >> 20 << 20
    if grow <= 0:
        return plan
    bigger = replan(dataclasses.replace(fp, scratch_bytes=fp.scratch_bytes + grow))
    same = ("resident_layers", "streamed_layers", "disk_layers", "embed_on_device", "lm_head_resident",
            "num_slots", "prefill_chunk", "prefill_state_place", "host_layers")
    return bigger if all(getattr(bigger, a) == getattr(plan, a) for a in same) else plan


def _plan_once(fp: Footprint, *, vram_budget: int | None, host_budget: int | None, batch: int, max_context: int,
               prefill_chunk: int, device_free: int | None, h2d_gbps: float, h2d_source: str,
               disk_gbps: float | None, hbm_gbps: float, outside_bytes: int, auto_chunk: bool,
               host_compute: HostCompute, host_gbps: float | None, host_source: str, prefill_states: str,
               host_extra_s: float, host_ram: int | None, host_held: int) -> Plan:
    """make_plan for one footprint, its tile as given."""
    check_workload(batch, max_context, prefill_chunk)
    if not h2d_gbps > 0:
        raise ValueError(f"h2d_gbps must be positive, got {h2d_gbps}")
    if host_gbps is not None and not host_gbps > 0:
        raise ValueError(f"host_gbps must be positive, got {host_gbps}")
    if not host_extra_s >= 0:
        raise ValueError(f"host_extra_s must be zero or positive, got {host_extra_s}")
    notes: list[str] = []
    s = sizes(fp, batch, max_context, prefill_chunk)
    budget = resolve_budget(vram_budget, device_free, all_resident_bytes(s), notes)
    outside = outside_bytes if budget == vram_budget else 0
    host = resolve_host_budget(host_budget, notes)
    x = StateInputs(fp, batch, max_context, prefill_chunk, auto_chunk, host)
    f = place_states(x, budget - outside, outside, prefill_states, notes)
    if f is None:
        s = sizes(fp, batch, max_context, prefill_chunk, prefill_states != "vram")
        minimum = minimum_bytes(s)
        what = "VRAM budget" if budget == vram_budget else "the GPU's free memory"
        context = f" + {format_size(outside)} for the CUDA context and kernels" if outside else ""
        raise ValueError(
            f"{what} {format_size(budget)} is below the minimum {format_size(minimum + outside)} for this model at "
            f"batch {batch}, context {max_context}: KV cache {format_size(s.kv)} + workspace "
            f"{format_size(s.workspace)} + 2 staging slots of {format_size(s.layer)}{context}. Raise --vram-budget to "
            f"at least {format_size(minimum + outside)}, or lower --max-context or --batch (or --prefill-chunk).")
    w = _Workload(batch, max_context, f.chunk, float(h2d_gbps), h2d_source, disk_gbps, hbm_gbps,
                  host_compute, host_gbps, host_source, host_extra_s, host_ram, host_held)
    if max_context > fp.max_positions:
        notes.append(f"max_context {max_context} exceeds the model's max_position_embeddings "
                     f"{fp.max_positions}: quality beyond it is not guaranteed")
    plan = _assemble(fp, f, w, (budget, outside), host, list(notes))
    return _other_head_if_faster(fp, f, w, (budget, outside), host, notes, plan)


def _assemble(fp: Footprint, f: Fit, w: _Workload, budget: tuple[int, int], host: int, notes: list[str]) -> Plan:
    s, r, t = f.sizes, f.residency, f.tiers
    n, batch = s.n, w.batch
    chunks = 0 if r.lm_head_resident else head_chunk_count(fp, s)
    streamed_layers = r.streamed
    streamed = (sum(s.layers[i] for i in streamed_layers) + (0 if r.lm_head_resident else s.lm_head)
                + (0 if r.embed_on_device else batch * s.row))
    # streamed weights read from the checkpoint files each step (embedding rows are too few to count)
    disk = sum(s.layer_file[i] for i in t.disk_layers) + (s.lm_head_file if t.lm_head_tier == "disk" else 0)
    lane = _host_lane(fp, s, r, t, w, streamed - sum(s.layers[i] for i in streamed_layers), notes)
    host_layers = lane.layers if lane is not None else ()
    streamed -= sum(s.layers[i] for i in host_layers)  # a decode step computes them on the CPU
    step, bound = _predict(s, streamed, disk, w, notes, lane)
    modules = tuple(dataclasses.replace(m, placement="host", reason="computed on the CPU from its pinned host copy "
                                        "in a decode step (a prefill streams it)")
                    if m.kind == "layer" and int(m.name.split(".")[1]) in host_layers else m
                    for m in module_plans(s, r, t, batch, chunks))
    resident = sum(m.bytes for m in modules if m.placement == "resident")
    staging = r.num_slots * s.layer
    return Plan(
        modules=modules, resident_layers=tuple(i for i in range(n) if i not in streamed_layers),
        streamed_layers=streamed_layers,
        disk_layers=t.disk_layers, embed_on_device=r.embed_on_device, lm_head_resident=r.lm_head_resident,
        lm_head_chunks=chunks, num_slots=r.num_slots, slot_bytes=s.layer if r.num_slots else 0,
        layer_bytes=s.layer, resident_weight_bytes=resident, staging_bytes=staging, kv_cache_bytes=s.kv,
        workspace_bytes=s.workspace, prefill_state_bytes=s.state, prefill_state_place=f.place,
        prefill_state_host_bytes=s.state_host, total_bytes=resident + staging + s.kv + s.workspace,
        budget_bytes=budget[0], outside_bytes=budget[1],
        streamed_bytes_per_step=streamed, disk_bytes_per_step=disk, host_pinned_bytes=t.host_pinned + s.state_host,
        host_budget_bytes=host, predicted_step_s=step, predicted_tok_s=batch / step, step_bound=bound,
        h2d_gbps=w.h2d_gbps, h2d_source=w.h2d_source, dtype=fp.dtype, batch=batch,
        max_context=w.max_context, prefill_chunk=w.prefill_chunk, notes=tuple(notes), host_lane=lane,
        scratch_bytes=fp.scratch_bytes)
