"""Before any weight is read: does the plan fit this machine's RAM (and, on the CPU, is fp32 affordable)?

On a GPU the planner already holds the device part to the VRAM budget (clamped to the free
memory); what it cannot see is RAM: the pinned host tier and the process itself. On the CPU the
"VRAM" part of the plan *is* RAM too, so the device part, the host tier and the process all
share one pool. Everything here works on plain numbers (a :class:`Machine` and the plan's byte
totals) so the decisions can be tested with small fake memory figures.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from memory.placement import DISK_RING
from memory.units import format_size as fs

log = logging.getLogger(__name__)

GiB = 2**30
# RAM a run must leave to the system: below this the kernel's OOM killer strikes. Defaults (the host
# budget, the CPU dtype) keep the larger Machine.margin; only a plan past this line is refused.
SYSTEM_RESERVE = 1 * GiB
# RAM the process needs besides the plan: interpreter, torch, tokenizer, buffers (on a GPU the pinned upload ring
# of engine.upload, 64 MiB). The tiny default model's whole process measured 364 MiB RSS on the CPU (torch 2.13,
# 2026-12-01); rounded up.
PROCESS_BYTES = 512 * 2**20


class InsufficientMemoryError(ValueError):
    """The run cannot fit this machine; the message gives the numbers and what to change."""


@dataclass(frozen=True)
class Machine:
    """Memory figures of the machine (bytes): RAM total / available, the device kind."""

    ram_total: int
    ram_available: int
    device: str = "cpu"  # "cpu" | "cuda"

    @property
    def margin(self) -> int:
        """RAM left alone for the OS and other processes: max(2 GiB, a tenth of the RAM)."""
        return max(2 * GiB, self.ram_total // 10)

    @property
    def usable(self) -> int:
        """RAM this process may plan with: available minus the margin (never negative)."""
        return max(0, self.ram_available - self.margin)

    @property
    def limit(self) -> int:
        """RAM past which a run is refused: available minus :data:`SYSTEM_RESERVE`."""
        return max(0, self.ram_available - SYSTEM_RESERVE)

    @classmethod
    def probe(cls, device: str) -> Machine:
        """This machine's figures (psutil), held to the memory limit of the process's cgroup (memory.ram)."""
        from memory.ram import ram
        r = ram()
        return cls(ram_total=r.total, ram_available=r.available, device=device)


_ENGINE_BYTES = ("host_table_bytes", "load_bounce_bytes", "convert_bytes")  # the plan's fields engine.host_ram sets


@dataclass(frozen=True)
class PlanBytes:
    """The byte totals of a plan that land in RAM (see ``memory.plan.Plan``)."""

    device_total: int  # resident weights + staging + KV cache + workspace ("VRAM")
    host_pinned: int  # streamed layers kept in (pinned) host memory
    disk_per_step: int  # bytes read from the checkpoint files per step
    dtype: str
    host_kv: int = 0  # the host lane's KV cache (memory.plan.HostLane.kv_bytes)
    disk_ring: int = 0  # the disk tier's staging ring (memory.placement.DISK_RING slots; pinned on a GPU)
    host_held: int = 0  # the host lane's converted weights (memory.plan.HostLane.held_bytes)
    host_table: int = 0  # an embedding kept in host memory outside the file map (engine.host_ram)
    load_bounce: int = 0  # the resident layers' upload bounce buffers, held only while they load (engine.host_ram)
    convert: int = 0  # what each loading thread holds converting a layer (engine.convert_ram)
    convert_what: str = ""  # that conversion, in words ("AWQ repacking")

    @classmethod
    def of(cls, plan) -> PlanBytes:
        lane = plan.host_lane
        ring = DISK_RING * plan.slot_bytes if plan.disk_bytes_per_step else 0  # any unit read from disk
        extra = (getattr(plan, f, 0) for f in _ENGINE_BYTES)  # 0 for a plan-like object
        return cls(plan.total_bytes, plan.host_pinned_bytes, plan.disk_bytes_per_step, plan.dtype,
                   lane.kv_bytes if lane is not None else 0, ring, getattr(lane, "held_bytes", 0), *extra,
                   getattr(plan, "convert_what", ""))


def _held(p: PlanBytes) -> int:
    """What the run holds in host memory once loaded: the host tier, the host lane's KV cache and converted
    weights, the disk tier's ring, a host embedding table."""
    return p.host_pinned + p.host_kv + p.host_held + p.disk_ring + p.host_table


def ram_needed(p: PlanBytes, m: Machine) -> int:
    """RAM the run needs: the process, the device part on the CPU, the more of what it holds once loaded
    (:func:`_held`) and the bounce buffers it holds while loading (freed before the rest is allocated), and one
    loading thread converting a layer (beside either phase; the disk tier's reader converts while the run goes on)."""
    return PROCESS_BYTES + (p.device_total if m.device == "cpu" else 0) + max(_held(p), p.load_bounce) + p.convert


def host_lane_ram(p: PlanBytes, m: Machine) -> int:
    """RAM a host lane's KV cache and converted weights may take beside a plan without one (``p``): what is left
    under the limit once it is loaded (a conversion only where the disk tier's reader converts layers)."""
    loaded = dataclasses.replace(p, load_bounce=0, convert=p.convert if p.disk_ring else 0)
    return max(0, m.limit - ram_needed(loaded, m))


def default_host_budget(m: Machine, vram_budget: int | None) -> int:
    """Host budget when none is given: the usable RAM minus the process, and on the CPU minus the
    --vram-budget too (the device part of the plan is RAM there)."""
    device = vram_budget if m.device == "cpu" and vram_budget is not None else 0
    return max(0, m.usable - device - PROCESS_BYTES)


def check_fits(p: PlanBytes, m: Machine, host_budget_given: bool) -> None:
    """InsufficientMemoryError, in one line with the numbers and what to change, unless the plan fits RAM."""
    need = ram_needed(p, m)
    if need <= m.limit:
        return
    parts = [f"{fs(p.device_total)} for the model on the CPU ({p.dtype})"] if m.device == "cpu" else []
    parts += _held_parts(p) if _held(p) >= p.load_bounce else \
        [f"{fs(p.load_bounce)} of pinned bounce buffers while the resident layers load"]
    if p.convert:
        parts.append(f"{fs(p.convert)} for a loading thread converting a layer ({p.convert_what})")
    parts.append(f"{fs(PROCESS_BYTES)} for the process")
    have = (f"{fs(m.limit)} can be used ({fs(m.ram_available)} available of {fs(m.ram_total)} RAM, minus "
            f"{fs(SYSTEM_RESERVE)} kept for the system)")
    raise InsufficientMemoryError(f"this run needs {fs(need)} of RAM ({' + '.join(parts)}) but {have}: "
                                  + _advice(p, m, host_budget_given))


def _held_parts(p: PlanBytes) -> list[str]:
    """:func:`_held`'s nonzero parts, in words."""
    named = [(p.host_pinned, "of streamed layers in host memory"),
             (p.host_kv, "of KV cache for the host lane's layers"),
             (p.host_held, "of the host lane's converted weights"),
             (p.disk_ring, "of staging for the layers read from disk"),
             (p.host_table, "for the embedding table in host memory (GGUF blocks widened)")]
    return [f"{fs(n)} {what}" for n, what in named if n]


def _advice(p: PlanBytes, m: Machine, host_budget_given: bool) -> str:
    tips = ["give fewer --host-compute layers (or off)"] if p.host_kv or p.host_held else []
    if p.load_bounce > _held(p):
        tips.append("give --threads 1 (one bounce buffer while loading)")
    if p.host_pinned and host_budget_given:
        tips.append("lower --host-budget (layers beyond it are read from disk)")
    if m.device == "cpu":
        if p.dtype == "float32":
            tips.append("use --dtype bf16 (half the bytes)")
        tips.append("give a --vram-budget below the usable RAM to stream the rest from disk (slow)")
        tips.append("or lower --max-context / --batch")
    else:
        tips.append("lower --host-budget")
    if p.convert:
        tips.append("or free some RAM (close other programs)")
    return "; ".join(tips)


def loading_threads(p: PlanBytes, m: Machine, threads: int) -> int:
    """How many loading threads (of ``threads``, at least 1) may convert layers at once: :func:`ram_needed` counts
    one thread's working set; each further one takes as much of what is left under the limit. All of them when
    nothing is converted. Logs at INFO when it is fewer than ``threads``."""
    if not p.convert or threads <= 1:
        return max(1, threads)
    room = max(0, m.limit - ram_needed(p, m))
    fit = min(threads, 1 + room // p.convert)
    if fit < threads:
        log.info("loading with %d thread(s) instead of %d: each holds about %s converting a layer (%s) and %s is left "
                 "under the RAM limit beside the plan and one such thread", fit, threads, fs(p.convert),
                 p.convert_what, fs(room))
    return fit


def fit_loading(p: PlanBytes, m: Machine, threads: int, host_budget_given: bool) -> int:
    """:func:`check_fits`, then :func:`loading_threads`: the threads to load with."""
    check_fits(p, m, host_budget_given)
    return loading_threads(p, m, threads)


def cpu_dtype_note(fp32: PlanBytes, m: Machine, file_dtype: str, host_budget_given: bool) -> str | None:
    """Why ``--dtype auto`` on the CPU computes in the checkpoint's dtype instead of fp32, or None to keep fp32.

    fp32 is kept when its plan fits the usable RAM and reads nothing from disk per step (disk reads
    the user asked for with an explicit host budget do not count)."""
    disk = fp32.disk_per_step and not host_budget_given
    if file_dtype == "float32" or (ram_needed(fp32, m) <= m.usable and not disk):
        return None
    short = "reads layers from disk every step" if ram_needed(fp32, m) <= m.usable else \
        f"needs {fs(ram_needed(fp32, m))} of RAM, {fs(m.usable)} usable"
    return (f"computing in the checkpoint's {file_dtype} instead of fp32 (the CPU default): fp32 doubles the "
            f"weights and {short}; pass --dtype fp32 to insist")
