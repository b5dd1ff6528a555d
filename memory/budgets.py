"""Budgets the planner works within: the VRAM budget (the user's, clamped to what the GPU has
free), the host budget for pinned streamed layers, and the workload's sanity checks."""

from __future__ import annotations

from memory.ram import ram
from memory.units import format_size


def check_workload(batch: int, max_context: int, prefill_chunk: int) -> None:
    """ValueError unless batch, max_context and prefill_chunk are positive integers."""
    for name, v in (("batch", batch), ("max_context", max_context), ("prefill_chunk", prefill_chunk)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def resolve_budget(vram_budget: int | None, device_free: int | None, all_resident: int, notes: list[str]) -> int:
    """The VRAM budget to plan with: the user's, clamped to the GPU's free memory; the free memory
    when none is given; everything resident on the CPU. Each choice is explained in ``notes``."""
    if vram_budget is not None and vram_budget <= 0:
        raise ValueError(f"VRAM budget must be positive, got {vram_budget}: pass e.g. --vram-budget 6GiB")
    if device_free is not None and device_free <= 0:
        raise ValueError(f"the GPU reports {device_free} bytes free: close other processes using it")
    if vram_budget is None and device_free is None:
        notes.append("no VRAM budget and no device memory figure (CPU): planning everything resident")
        return all_resident
    if vram_budget is None:
        notes.append(f"no VRAM budget given: using the GPU's free memory, {format_size(device_free)}")
        return device_free
    if device_free is not None and vram_budget > device_free:
        notes.append(f"VRAM budget {format_size(vram_budget)} exceeds the GPU's free memory "
                     f"{format_size(device_free)}: clamped to {format_size(device_free)}")
        return device_free
    return vram_budget


def resolve_host_budget(host_budget: int | None, notes: list[str]) -> int:
    """Pinned host memory for streamed layers: the user's, else available RAM minus a margin
    (the larger of 2 GiB and a tenth of the RAM)."""
    if host_budget is not None:
        if host_budget < 0:
            raise ValueError(f"host budget must be >= 0, got {host_budget}: pass e.g. --host-budget 32GB")
        return host_budget
    vm = ram()  # held to the cgroup's limit in a container
    margin = max(2 << 30, vm.total // 10)
    budget = max(0, vm.available - margin)
    notes.append(f"host budget: {format_size(vm.available)} available minus a {format_size(margin)} margin "
                 f"= {format_size(budget)}")
    return budget
