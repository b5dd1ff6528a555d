"""GPU memory the process holds outside torch's caching allocator, as the driver counts it.

``--vram-budget`` is the process's GPU memory as NVML and nvidia-smi show it. Torch's allocator
is only part of that: the CUDA context, cuBLAS's handle and workspace and the loaded kernel modules
come on top (0.5-0.7 GiB on an H100/H200). :func:`outside_allocator` measures them once the context
and cuBLAS are up (NVML's per-process figure minus torch's reserved bytes) and adds an allowance for
the kernel modules that load later, so the planner and the allocator cap can use what is left.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from kernels.cublas import matmul_released

log = logging.getLogger(__name__)

KERNEL_MODULES_ALLOWANCE = 192 << 20  # Triton modules loaded after the measurement (measured: see README)
DEFAULT_CONTEXT_BYTES = 768 << 20  # when NVML cannot give a per-process figure


@dataclass(frozen=True)
class Outside:
    """Bytes the process holds outside the caching allocator, and how the figure was obtained."""

    bytes: int
    source: str


def nvml_process_used(dev: torch.device) -> tuple[int | None, str]:
    """This process's GPU memory as NVML sees it (driver view: context + allocator reserve), or
    (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "pynvml not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver access (containers, MIG)
        return None, f"NVML init failed: {e}"
    try:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        try:
            bus = f"{getattr(p, 'pci_domain_id', 0):08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:
            handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        for pr in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if pr.pid == os.getpid():
                used = pr.usedGpuMemory
                return (int(used), "") if used else (None, "NVML reports no figure for this process")
        return None, "this process is not in NVML's list (PID namespace?)"
    except Exception as e:
        return None, f"NVML query failed: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


_MEASURED: dict[int, Outside] = {}  # per device index: the process's first measurement


def outside_allocator(dev: torch.device) -> Outside:
    """Start the CUDA context and cuBLAS on ``dev``, then measure what they hold beyond torch's
    reserved bytes, plus :data:`KERNEL_MODULES_ALLOWANCE` for kernels loaded later. Measured once per
    process and device: a later engine (a second ``LLM`` in a notebook) would count the first one's
    kernel modules as context and the allowance again, and plan with less than the budget gives."""
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _MEASURED:
        _MEASURED[idx] = _measure(dev)
    return _MEASURED[idx]


def _measure(dev: torch.device) -> Outside:
    a = torch.ones(64, 64, device=dev)
    # creates the context and the cuBLAS handle; its workspace, in torch's allocator (not counted here), is released:
    # the engine's passes never use it
    matmul_released(a, a).sum().item()
    del a
    used, why = nvml_process_used(dev)
    if used is None:
        log.info("per-process GPU memory unavailable (%s): assuming %d MiB for the CUDA context", why,
                 DEFAULT_CONTEXT_BYTES >> 20)
        return Outside(DEFAULT_CONTEXT_BYTES + KERNEL_MODULES_ALLOWANCE, f"estimated ({why})")
    context = max(0, used - torch.cuda.memory_reserved(dev))
    return Outside(context + KERNEL_MODULES_ALLOWANCE,
                   f"measured {context / 2**20:.0f} MiB (NVML) + {KERNEL_MODULES_ALLOWANCE >> 20} MiB for kernels")
