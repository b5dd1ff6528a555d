"""What the in-process server probes share (bench/burst_probe.py, first_request_probe.py, intake_probe.py):
the server's engine flags as ``tools.bench_serve``'s ``session_run.sh`` levels use them, and a device sync
around timed calls."""
from __future__ import annotations

import argparse

import torch


def server_parser(description: str) -> argparse.ArgumentParser:
    """A parser with ``--model`` and the engine flags of the served levels (6 GiB, 32 slots, 2304 context)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--vram-budget", default="6GiB")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-context", type=int, default=2304)
    return p


def sync() -> None:
    """Wait for the device's queued work (nothing on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
