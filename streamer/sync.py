"""Streams and events for the streamer, on CUDA or on a CPU stand-in.

On CUDA these are real streams and events. On the CPU (tests, CI) copies are
synchronous, so events need do nothing; but every record and wait is appended to a
log, so tests can check the order of copies, waits and slot reuse without a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class SyncLog:
    """Ordered record of streamer actions: (action, unit index, slot)."""

    entries: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, action: str, unit: int, slot: int) -> None:
        self.entries.append((action, unit, slot))


class _CpuEvent:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CpuStream:
    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class Sync:
    """Creates the copy stream and events for a device, and hides CPU/CUDA differences."""

    def __init__(self, device: torch.device, log: SyncLog | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.log = log
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else _CpuStream()

    def event(self, timing: bool = False):
        return torch.cuda.Event(enable_timing=timing) if self.cuda else _CpuEvent()

    def compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else _CpuStream()

    def on_copy_stream(self):
        return torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()

    def note(self, action: str, unit: int, slot: int) -> None:
        if self.log is not None:
            self.log.add(action, unit, slot)
