"""Hold torch's CUDA caching allocator to the VRAM budget while an engine is open.

The planner keeps the engine's *allocated* bytes inside ``--vram-budget``, but the caching
allocator also keeps freed blocks *reserved* for reuse, and fragmentation (a 2048-token
prefill's activations next to the tuners' scratch) can push the process's reserved memory
past the budget: on the H100 at 6 GiB, 6.457 GB reserved against 6.442 GB (allocated 6.364 GB).
``torch.cuda.set_per_process_memory_fraction`` makes the allocator count reserved memory
against a ceiling: at the ceiling it first returns cached blocks to the driver, and only
when the live tensors themselves do not fit does it raise ``torch.OutOfMemoryError``.
So what the process holds from the driver (the CUDA context aside) stays inside the budget.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def _get_fraction(index: int) -> float | None:
    """The allocator's current fraction; None on a torch without the getter."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return float(get(index)) if get is not None else None


def prefer_expandable_segments() -> bool:
    """Turn on the caching allocator's expandable segments unless ``PYTORCH_CUDA_ALLOC_CONF`` already says.

    With fixed segments, a serving pass's differently sized activations (a stacked 1,024-row run next to a
    968-token group) leave freed gaps inside segments that still hold live tensors; under the cap those gaps
    are lost: the bf16 7B at 6 GiB served 16 long prompts into ``OutOfMemoryError`` with 4.94 GiB allocated
    of 5.15 GiB allowed and 165 MiB reserved but unusable (H200, session 24). Expandable segments grow one
    mapping a page at a time, so freed memory is usable again whatever its size. The user's own setting
    (``expandable_segments:False`` included) is left alone. Returns whether it turned them on.

    torch reads the environment once, when its allocator settings are first needed, which may be before CUDA
    starts (torch 2.13 on the CPU: the first read of the settings fixes them), so the running settings are
    told too, with the user's other settings kept."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" in conf:
        return False
    setting = "expandable_segments:True"
    full = f"{conf},{setting}" if conf else setting
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = full  # for settings not read yet (and child processes)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is not None:
        setter(full)
    elif torch.cuda.is_initialized():  # read already, and this torch cannot change them
        log.info("CUDA already started and this torch cannot change its allocator's settings: "
                 "expandable segments stay off")
        return False
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None and setting not in getter():
        log.warning("the caching allocator did not take %s (its settings: %r): a served pass's freed memory may "
                    "stay unusable under the VRAM budget", setting, getter())
        return False
    log.info("caching allocator: expandable segments on")
    return True


class AllocatorCap:
    """Caps the caching allocator of ``device`` at ``budget`` bytes until :meth:`release`.

    Process-wide (torch has one allocator per device): another library's CUDA memory in the
    same process counts against the cap too. :meth:`release` restores the fraction that was in
    effect before, unless someone changed it since (then it leaves theirs alone).
    """

    def __init__(self, device: torch.device, budget: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"AllocatorCap needs a CUDA device, got {device}")
        if budget <= 0:
            raise ValueError(f"VRAM budget must be positive, got {budget} bytes")
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(self.index).total_memory
        self.fraction = min(1.0, budget / total)
        self.previous = _get_fraction(self.index)
        if self.previous is None:
            self.previous = 1.0  # the allocator's default
        torch.cuda.set_per_process_memory_fraction(self.fraction, self.index)
        self.active = True
        log.info("caching allocator capped at %.4f of cuda:%d (%d bytes)", self.fraction, self.index, budget)

    def release(self) -> None:
        """Restore the previous fraction (idempotent)."""
        if not self.active:
            return
        self.active = False
        now = _get_fraction(self.index)
        if now is None or abs(now - self.fraction) <= 1e-6 * self.fraction:  # stored with rounding
            torch.cuda.set_per_process_memory_fraction(self.previous, self.index)
