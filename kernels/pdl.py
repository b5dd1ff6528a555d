"""Programmatic dependent launch (PDL) for the kernels of a decode step, off unless ``LAYERSTREAM_PDL=1``.

A batch-1 decode step of the 7B AWQ on an H200 is ~267 kernels in 2.9 ms, of which the kernels run 2.60 ms
(session 23): ~1 us passes between two dependent kernels, and a kernel's first programs start only when the one
before has drained. With PDL (compute capability 9.0 and later), a kernel launched with ``launch_pdl=True`` may
start while the one before it runs; its programs wait (``gdc_wait``: every memory operation of the kernel before
is complete and visible) before they touch anything, then at once let the next kernel launch
(``gdc_launch_dependents``), so at most one kernel waits ahead of the one running. Only a kernel that begins with
:func:`enter` may be launched with PDL: :func:`opts` gives both its ``PDL_CHAIN`` constexpr and the launch option, so
one never goes without the other. A kernel launched after one that did not call ``gdc_launch_dependents`` simply
starts when it ends; torch's kernels are launched plainly.

Measured: not yet (bench/probe_pdl.py times the decode step's shape of chain with and without).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: never enabled
    gdc_launch_dependents = gdc_wait = None

ENABLED = (os.environ.get("LAYERSTREAM_PDL", "0") == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1"
           and gdc_wait is not None)
_CAPABLE: dict[int, bool] = {}


def active(t: torch.Tensor) -> bool:
    """Whether launches on ``t``'s device use PDL (enabled, CUDA, compute capability 9.0+)."""
    if not ENABLED or t.device.type != "cuda":
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABLE:
        _CAPABLE[idx] = torch.cuda.get_device_capability(idx) >= (9, 0)
    return _CAPABLE[idx]


def opts(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel that begins with ``enter(PDL_CHAIN)``, for operands on ``t``'s device:
    ``{"PDL_CHAIN": True, "launch_pdl": True}`` where :func:`active`, else ``{}`` (the kernel's default, no PDL)."""
    return {"PDL_CHAIN": True, "launch_pdl": True} if active(t) else {}


@triton.jit
def enter(PDL_CHAIN: tl.constexpr):
    """A PDL kernel's first statement: wait for the kernel before it, then let the next one launch."""
    if PDL_CHAIN:
        gdc_wait()
        gdc_launch_dependents()
