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

``LAYERSTREAM_PDL=prefetch`` also has the int4 GEMVs (kernels/qgemv.py, kernels/qgemv_i8.py) issue an L2 prefetch of
the first lines of their rows' packed words before they wait (``enter_prefetching``): the weights need nothing
from the kernel before, so a GEMV's first bytes are on their way while it finishes.

Measured (session 33, H200, bench/ab_decode.sh): the 7B AWQ's batch-1 decode 362-366 tok/s with PDL against
323-340 without, the same greedy text.
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

_MODE = os.environ.get("LAYERSTREAM_PDL", "1")  # 0: off; 1 (default): PDL; prefetch: PDL, and the GEMVs prefetch before they wait
ENABLED = _MODE in ("1", "prefetch") and os.environ.get("TRITON_INTERPRET", "0") != "1" and gdc_wait is not None
PREFETCH = ENABLED and _MODE == "prefetch"
PREFETCH_LINES = tl.constexpr(16)  # 128-byte lines of each weight row a GEMV program prefetches (K 3584 int4: 14 a row)
if _MODE not in ("0", "1", "prefetch"):
    logging.getLogger(__name__).warning("LAYERSTREAM_PDL=%r is none of 0, 1, prefetch: PDL stays off", _MODE)


def active(t: torch.Tensor) -> bool:
    """Whether launches on ``t``'s device use PDL (enabled, CUDA, compute capability 9.0+)."""
    if not ENABLED or t.device.type != "cuda":
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def opts(t: torch.Tensor, prefetch: bool = False) -> dict:
    """The launch keywords of a kernel that begins with ``enter(PDL_CHAIN)`` (``prefetch``: with
    ``enter_prefetching``), for operands on ``t``'s device: ``{"PDL_CHAIN": True, "launch_pdl": True}`` (and
    ``PDL_PREFETCH`` under ``LAYERSTREAM_PDL=prefetch``) where :func:`active`, else ``{}`` (no PDL)."""
    if not active(t):
        return {}
    return {"PDL_CHAIN": True, "launch_pdl": True, **({"PDL_PREFETCH": True} if prefetch and PREFETCH else {})}


@triton.jit
def enter(PDL_CHAIN: tl.constexpr):
    """A PDL kernel's first statement: wait for the kernel before it, then let the next one launch."""
    if PDL_CHAIN:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def enter_prefetching(PDL_CHAIN: tl.constexpr, PDL_PREFETCH: tl.constexpr, q_ptr, N, K, stride_qn,
                      BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """``enter`` for a GEMV over ``BITS``-bit codes packed in int32 words ``q_ptr`` [N, K * BITS / 32], programs
    of BLOCK_N rows (axis 0) and SPLIT_K parts of K in blocks of BLOCK_K (axis 1): with PDL_PREFETCH, before
    waiting, an L2 prefetch of up to PREFETCH_LINES 128-byte lines of each of the program's rows (wrapped onto
    valid rows) from its part's first word: the weights need nothing from the kernel before, so their first
    bytes are on their way while it finishes."""
    if PDL_CHAIN:
        if PDL_PREFETCH:
            rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)) % N
            word0 = tl.program_id(1) * tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * (BLOCK_K * BITS // 32)
            words = tl.minimum(word0 + tl.arange(0, PREFETCH_LINES) * 32, K * BITS // 32 - 1)  # within the row
            _prefetch_l2(q_ptr + rows[:, None].to(tl.int64) * stride_qn + words[None, :])
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs):
    """An L2 prefetch of the line holding each of ``ptrs`` (an instruction with a side effect: never removed)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
