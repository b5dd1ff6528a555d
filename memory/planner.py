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
* With ``host_compute`` other than ``off``, some pinned streamed layers are computed on the CPU in
  a decode step (placement ``host``; a prefill still streams them): see ``memory.host_lane``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from memory.budgets import check_workload, resolve_budget, resolve_host_budget
from memory.footprint import Footprint
from memory.host_lane import HostCompute, LaneInputs, host_lane
from memory.plan import HostLane, ModulePlan, Plan
from memory.units import format_size

log = logging.getLogger(__name__)

__all__ = ["make_plan", "minimum_budget", "Plan", "ModulePlan", "HBM_GBPS"]

HBM_GBPS = 2500.0  # decode-step estimate when nothing streams: weights / 2.5 TB/s
MIN_AUTO_CHUNK = 64  # the smallest prefill chunk the planner picks by itself (tokens)


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


@dataclass(frozen=True)
class _Sizes:
    layer: int  # the largest packed layer: one staging slot, and what each residency decision costs
    layers: tuple[int, ...]  # each layer's packed bytes
    layer_file: tuple[int, ...]  # each layer's bytes in the checkpoint files
    embed: int
    lm_head: int  # == embed when tied (the same tensor)
    norm: int
    row: int  # one embedding / lm_head row
    row_file: int
    lm_head_file: int
    kv: int
    workspace: int
    state: int  # the part of workspace holding a long prompt's other chunks
    tied: bool

    @property
    def fixed(self) -> int:
        return self.kv + self.workspace + self.norm

    @property
    def n(self) -> int:
        return len(self.layers)


def _sizes(fp: Footprint, batch: int, max_context: int, prefill_chunk: int) -> _Sizes:
    """Every size the planner needs, from the model's footprint and the workload."""
    layers, embed, head = fp.layers, fp.only("embedding"), fp.only("lm_head")
    return _Sizes(layer=max((m.bytes for m in layers), default=0), layers=tuple(m.bytes for m in layers),
                  layer_file=tuple(m.file_bytes for m in layers), embed=embed.bytes, lm_head=head.bytes,
                  norm=fp.only("norm").bytes, row=embed.bytes // fp.rows, row_file=embed.file_bytes // fp.rows,
                  lm_head_file=head.file_bytes, kv=fp.kv_bytes(batch, max_context),
                  workspace=fp.workspace_bytes(batch, max_context, prefill_chunk),
                  state=fp.prefill_state_bytes(batch, max_context, prefill_chunk), tied=fp.tied)


def _all_resident_bytes(s: _Sizes) -> int:
    return s.fixed + sum(s.layers) + s.embed + (0 if s.tied else s.lm_head)


def _minimum(s: _Sizes) -> int:
    return min(_all_resident_bytes(s), s.fixed + 2 * s.layer)


def _smaller_chunk(fp: Footprint, batch: int, max_context: int, chunk: int, budget: int) -> int | None:
    """The largest of chunk/2, chunk/4, ... (not below ``MIN_AUTO_CHUNK`` tokens or the batch) whose plan
    fits ``budget``: one chunk's activations shrink with it, the other chunks' prompt states grow a little."""
    c = chunk // 2
    while c >= max(MIN_AUTO_CHUNK, batch):
        if _minimum(_sizes(fp, batch, max_context, c)) <= budget:
            return c
        c //= 2
    return None


def minimum_budget(fp: Footprint, *, batch: int = 1, max_context: int = 4096, prefill_chunk: int = 2048) -> int:
    """The smallest VRAM budget that can run: KV + workspace + norm + two staging slots
    (or the whole model resident, if that is smaller)."""
    check_workload(batch, max_context, prefill_chunk)
    return _minimum(_sizes(fp, batch, max_context, prefill_chunk))


@dataclass(frozen=True)
class _Residency:
    resident: int  # number of layers kept resident
    lm_head_resident: bool
    embed_on_device: bool
    num_slots: int
    streamed: tuple[int, ...]  # the streamed layers, in execution order


def _spread(n: int, k: int) -> tuple[int, ...]:
    """k of the layers 0..n-1, evenly spaced and starting at layer 0."""
    return tuple(j * n // k for j in range(k)) if k else ()


def _choose_residency(s: _Sizes, budget: int) -> _Residency:
    n, tied = s.n, s.tied
    if _all_resident_bytes(s) <= budget:
        return _Residency(n, True, True, 0, ())
    if not tied and s.fixed + sum(s.layers) + s.lm_head <= budget:
        return _Residency(n, True, False, 0, ())  # only the embedding stays on the host
    avail = budget - s.fixed - 2 * s.layer
    assert avail >= 0, "budget was checked against the minimum"
    k_streamed_head = min(n, avail // s.layer)
    k_resident_head = min(n, (avail - s.lm_head) // s.layer) if s.lm_head <= avail else -1
    head = k_resident_head >= 0 and k_resident_head * s.layer + s.lm_head >= k_streamed_head * s.layer
    k = k_resident_head if head else k_streamed_head
    assert k < n or not head, "everything resident was handled above"
    leftover = avail - k * s.layer - (s.lm_head if head else 0)
    return _Residency(k, head, head and tied, 3 if leftover >= s.layer else 2, _spread(n, n - k))


@dataclass(frozen=True)
class _Tiers:
    disk_layers: tuple[int, ...]
    lm_head_tier: str  # "vram" | "pinned" | "disk"
    embed_tier: str
    host_pinned: int


def _assign_tiers(s: _Sizes, r: _Residency, host_budget: int) -> _Tiers:
    left, disk, spilled = host_budget, [], False
    for i in r.streamed:  # execution order: the last go to disk first
        if not spilled and s.layers[i] <= left:
            left -= s.layers[i]
        else:
            spilled = True
            disk.append(i)
    head_tier = "vram"
    if not r.lm_head_resident:
        head_tier = "pinned" if not spilled and s.lm_head <= left else "disk"
        left -= s.lm_head if head_tier == "pinned" else 0
    if r.embed_on_device:
        embed_tier = "vram"
    elif s.tied and not r.lm_head_resident:
        embed_tier = head_tier  # one host table is both the embedding and the streamed lm_head
    else:  # only a few rows are read per step: gather them from the mapped file, pin nothing
        embed_tier = "disk"
    return _Tiers(tuple(disk), head_tier, embed_tier, host_budget - left)


def _modules(s: _Sizes, r: _Residency, t: _Tiers, batch: int, chunks: int) -> tuple[ModulePlan, ...]:
    tied, where = s.tied, {"pinned": "pinned host memory", "disk": "the mmap'd checkpoint"}
    if r.embed_on_device:
        why = "tied to the resident lm_head: one GPU copy serves both" if tied and r.resident < s.n \
            else "the whole model fits the budget"
        out = [ModulePlan("embed_tokens", "embedding", s.embed, "resident", "vram", why)]
    else:
        out = [ModulePlan("embed_tokens", "embedding", s.embed, "host", t.embed_tier,
                          f"only the {batch} looked-up row(s) travel per step, from {where[t.embed_tier]}")]
    for i, size in enumerate(s.layers):
        if i not in r.streamed:
            out.append(ModulePlan(f"layers.{i}", "layer", size, "resident", "vram",
                                  "fits the budget (streamed layers are spread between the resident ones)"))
        elif i in t.disk_layers:
            out.append(ModulePlan(f"layers.{i}", "layer", size, "streamed", "disk",
                                  "streamed from the mmap'd checkpoint: the host budget cannot pin it"))
        else:
            out.append(ModulePlan(f"layers.{i}", "layer", size, "streamed", "pinned",
                                  "streamed through the staging slots from pinned host memory"))
    out.append(ModulePlan("norm", "norm", s.norm, "resident", "vram", "always resident (one hidden-sized vector)"))
    if r.lm_head_resident and tied:
        out.append(ModulePlan("lm_head", "lm_head", 0, "resident", "vram", "tied: uses embed_tokens' GPU copy"))
    elif r.lm_head_resident:
        out.append(ModulePlan("lm_head", "lm_head", s.lm_head, "resident", "vram",
                              "fits: saves its bytes every step and needs no chunking"))
    else:
        src = "the host embedding table (tied)" if tied else where[t.lm_head_tier]
        out.append(ModulePlan("lm_head", "lm_head", s.lm_head, "streamed", t.lm_head_tier,
                              f"streamed in {chunks} vocab-row chunks through the staging slots, from {src}"))
    return tuple(out)


def _predict(s: _Sizes, streamed: int, disk: int, w: _Workload, notes: list[str],
             lane: HostLane | None = None) -> tuple[float, str]:
    """(step seconds, bound): copies, disk reads and compute overlap, so the slowest one sets the pace;
    with host layers the host lane and the GPU's compute run one after the other, beside the copies."""
    weights_read = sum(s.layers) + s.lm_head + s.norm  # every weight is read from HBM once per step
    times = {"pcie": streamed / (w.h2d_gbps * 1e9), "hbm": weights_read / (w.hbm_gbps * 1e9)}
    if lane is not None and lane.layers:
        times = {"pcie": lane.copy_s, "host": lane.host_s + lane.gpu_s}
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


def _host_lane(fp: Footprint, s: _Sizes, r: _Residency, t: _Tiers, w: _Workload, copy_other: int,
               notes: list[str]) -> HostLane | None:
    """The decode step's host layers (None when ``host_compute`` is off)."""
    if w.host_compute == "off":
        return None
    x = LaneInputs(candidates=tuple(i for i in r.streamed if i not in t.disk_layers), layer_bytes=s.layers,
                   copy_other=copy_other, streamed=r.streamed, gpu_other=s.lm_head + s.norm, h2d_gbps=w.h2d_gbps,
                   hbm_gbps=w.hbm_gbps, host_gbps=w.host_gbps)
    kv_per_layer = fp.kv_bytes_per_token // max(1, s.n) * w.batch * w.max_context
    return host_lane(x, w.host_compute, w.host_source, kv_per_layer, notes)


def make_plan(fp: Footprint, *, vram_budget: int | None = None, host_budget: int | None = None, batch: int = 1,
              max_context: int = 4096, prefill_chunk: int = 2048, device_free: int | None = None,
              h2d_gbps: float = 25.0, h2d_source: str = "given", disk_gbps: float | None = None,
              hbm_gbps: float = HBM_GBPS, outside_bytes: int = 0, auto_chunk: bool = False,
              host_compute: HostCompute = "off", host_gbps: float | None = None,
              host_source: str = "given") -> Plan:
    """Plan residency and streaming for a model's footprint (see the module docstring for the rules).

    ``vram_budget`` None uses ``device_free`` (or, with neither, plans everything resident); a
    budget above ``device_free`` is clamped with a note. ``host_budget`` None is the available RAM
    minus max(2 GiB, 10%). ``outside_bytes`` is what the process holds on the GPU outside the
    allocator (CUDA context, kernels); it comes off a budget the user gave (the GPU's free memory
    is measured net of it already). With ``auto_chunk`` (the user did not choose ``prefill_chunk``), a
    budget below :func:`minimum_budget` halves the prefill chunk until the plan fits (not below
    ``MIN_AUTO_CHUNK`` tokens), with a note. ``host_compute`` (``auto``, ``off`` or a number of
    layers) with ``host_gbps`` (the host's GEMV GB/s at this batch) picks layers a decode step
    computes on the CPU (``memory.host_lane``); ``off`` plans as if there were no host lane. Raises
    ValueError when the budget is below the minimum or more host layers are forced than can be.
    """
    check_workload(batch, max_context, prefill_chunk)
    if not h2d_gbps > 0:
        raise ValueError(f"h2d_gbps must be positive, got {h2d_gbps}")
    if host_gbps is not None and not host_gbps > 0:
        raise ValueError(f"host_gbps must be positive, got {host_gbps}")
    notes: list[str] = []
    s = _sizes(fp, batch, max_context, prefill_chunk)
    budget = resolve_budget(vram_budget, device_free, _all_resident_bytes(s), notes)
    outside = outside_bytes if budget == vram_budget else 0
    if auto_chunk and budget - outside < _minimum(s):
        chunk = _smaller_chunk(fp, batch, max_context, prefill_chunk, budget - outside)
        if chunk is not None:
            notes.append(f"prefill chunk {chunk} tokens, not {prefill_chunk}: at {prefill_chunk} one chunk's "
                         f"activations next to the prompt's other chunks ({format_size(s.state)}) need "
                         f"{format_size(_minimum(s) + outside)}, over the budget (--prefill-chunk sets it)")
            prefill_chunk, s = chunk, _sizes(fp, batch, max_context, chunk)
    w = _Workload(batch, max_context, prefill_chunk, float(h2d_gbps), h2d_source, disk_gbps, hbm_gbps,
                  host_compute, host_gbps, host_source)
    if budget - outside < (minimum := _minimum(s)):
        what = "VRAM budget" if budget == vram_budget else "the GPU's free memory"
        context = f" + {format_size(outside)} for the CUDA context and kernels" if outside else ""
        raise ValueError(
            f"{what} {format_size(budget)} is below the minimum {format_size(minimum + outside)} for this model at "
            f"batch {batch}, context {max_context}: KV cache {format_size(s.kv)} + workspace "
            f"{format_size(s.workspace)} + 2 staging slots of {format_size(s.layer)}{context}. Raise --vram-budget to "
            f"at least {format_size(minimum + outside)}, or lower --max-context or --batch (or --prefill-chunk).")
    if max_context > fp.max_positions:
        notes.append(f"max_context {max_context} exceeds the model's max_position_embeddings "
                     f"{fp.max_positions}: quality beyond it is not guaranteed")
    r = _choose_residency(s, budget - outside)
    host = resolve_host_budget(host_budget, notes)
    plan = _assemble(fp, s, r, _assign_tiers(s, r, host), w, (budget, outside), host, notes)
    for note in plan.notes:
        log.info("memory plan: %s", note)
    return plan


def _assemble(fp: Footprint, s: _Sizes, r: _Residency, t: _Tiers, w: _Workload, budget: tuple[int, int], host: int,
              notes: list[str]) -> Plan:
    n, batch = s.n, w.batch
    chunks = 0 if r.lm_head_resident else math.ceil(fp.rows / (s.layer // s.row))
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
                    for m in _modules(s, r, t, batch, chunks))
    resident = sum(m.bytes for m in modules if m.placement == "resident")
    staging = r.num_slots * s.layer
    return Plan(
        modules=modules, resident_layers=tuple(i for i in range(n) if i not in streamed_layers),
        streamed_layers=streamed_layers,
        disk_layers=t.disk_layers, embed_on_device=r.embed_on_device, lm_head_resident=r.lm_head_resident,
        lm_head_chunks=chunks, num_slots=r.num_slots, slot_bytes=s.layer if r.num_slots else 0,
        layer_bytes=s.layer, resident_weight_bytes=resident, staging_bytes=staging, kv_cache_bytes=s.kv,
        workspace_bytes=s.workspace, prefill_state_bytes=s.state, total_bytes=resident + staging + s.kv + s.workspace,
        budget_bytes=budget[0], outside_bytes=budget[1],
        streamed_bytes_per_step=streamed, disk_bytes_per_step=disk, host_pinned_bytes=t.host_pinned,
        host_budget_bytes=host, predicted_step_s=step, predicted_tok_s=batch / step, step_bound=bound,
        h2d_gbps=w.h2d_gbps, h2d_source=w.h2d_source, dtype=fp.dtype, batch=batch,
        max_context=w.max_context, prefill_chunk=w.prefill_chunk, notes=tuple(notes), host_lane=lane)
