"""Programmatic dependent launch (PDL) for the kernels of a decode step: on where the GPU has it (compute
capability 9.0+), off under ``LAYERSTREAM_PDL=0``.

A batch-1 decode step of the 7B AWQ on an H200 is ~267 kernels in 2.9 ms, of which the kernels run 2.60 ms
(session 23): ~1 us passes between two dependent kernels, and a kernel's first programs start only when the one
before has drained. With PDL (compute capability 9.0 and later), a kernel launched with ``launch_pdl=True`` may
start while the one before it runs; its programs wait (``gdc_wait``: every memory operation of the kernel before
is complete and visible) before they touch anything, then at once let the next kernel launch
(``gdc_launch_dependents``), so at most one kernel waits ahead of the one running. Only a kernel that begins with
:func:`enter` may be launched with PDL: :func:`opts` gives both its ``PDL_CHAIN`` constexpr and the launch option, so
one never goes without the other. A kernel launched after one that did not call ``gdc_launch_dependents`` simply
starts when it ends; torch's kernels are launched plainly.

Measured (session 33, H200, bench/ab_decode.sh): the 7B AWQ's batch-1 decode 362-366 tok/s with PDL against
323-340 without, the same greedy text. Having the int4 GEMVs also prefetch the first lines of their rows' packed
words into L2 before they wait measured slower (301 tok/s, bench/results/2026-12-05-h200-s33/call2) and was removed.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: never enabled
    gdc_launch_dependents = gdc_wait = None

_MODE = os.environ.get("LAYERSTREAM_PDL", "1")  # 0: off; 1 (default): PDL
ENABLED = _MODE == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1" and gdc_wait is not None
if _MODE not in ("0", "1"):
    logging.getLogger(__name__).warning("LAYERSTREAM_PDL=%r is neither 0 nor 1: PDL stays off", _MODE)


def active(t: torch.Tensor) -> bool:
    """Whether launches on ``t``'s device use PDL (enabled, an NVIDIA GPU of compute capability 9.0+)."""
    if not ENABLED or t.device.type != "cuda":
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    """An NVIDIA GPU of compute capability 9.0+ (a ROCm build reports its gfx version there: never PDL)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


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
