"""A Triton launch that skips Triton's per-call argument binding once a kernel is compiled.

``fn[grid](*args, **meta)`` binds and specialises every argument in Python on each call (tens of
microseconds). A prefill that keeps its prompt states in host memory runs ~10 kernels per chunk and
layer, each a few tens of microseconds on an H200, so that binding made the pass host-bound (measured:
the host busy the whole 0.85 s pass, the GPU idle 0.21-0.29 s of it; bench/results/2026-12-02-h200-s15).

:class:`Launcher` keys each call by what Triton specialises on, or a superset of it: every tensor's
dtype and 16-byte alignment, every integer's ``== 1`` and ``% 16 == 0`` and 32-bit range, every tensor
descriptor's dtype, block, padding, alignment and the divisibility of its shape and strides, and every
keyword (constexprs and launch options) by value. The first call of a key goes through Triton (which
compiles or finds the kernel) and keeps the compiled kernel; later calls of that key hand the
arguments straight to it. Off in the interpreter, with ``LAYERSTREAM_FAST_LAUNCH=0``, while launch hooks
are installed (a profiler's) and for a Triton whose compiled kernels lack the entry points used here.
``LAYERSTREAM_FAST_LAUNCH_CHECK=1`` asks Triton for its own kernel on every call and checks it is the
one kept (the GPU tests run with it).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # absent from old Tritons: no descriptor arguments then
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = ()  # type: ignore[assignment,misc]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def enabled() -> bool:
    """Whether launches take the cached path (not in the interpreter; ``LAYERSTREAM_FAST_LAUNCH=0`` turns it off)."""
    return not _INTERPRET and os.environ.get("LAYERSTREAM_FAST_LAUNCH", "1") == "1"


def _int_spec(a: int) -> tuple:
    return ("i", a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31), 0 <= a < (1 << 64))


def spec(a: Any) -> Any:
    """What Triton may specialise a runtime argument on (a superset), as a hashable value."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return _int_spec(a)
    if isinstance(a, float):
        return "f"
    if isinstance(a, TensorDescriptor):
        return ("d", a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.block_shape), a.padding,
                tuple(_int_spec(int(s)) for s in a.shape), tuple(_int_spec(int(s)) for s in a.strides))
    raise TypeError(f"no launch key for a {type(a).__name__} argument")


_ALL: list[Launcher] = []


def counts() -> dict[str, int]:
    """Launches so far, by every Launcher: ``cached`` (straight to the kept kernel) and ``triton`` (Triton's path)."""
    return {"cached": sum(x.cached for x in _ALL), "triton": sum(x.triton for x in _ALL)}


class Launcher:
    """``Launcher(fn)(grid, *args, **meta)`` launches ``fn[grid](*args, **meta)`` (see the module docstring)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.names: list[str] = list(getattr(fn, "arg_names", []))
        self.kernels: dict[tuple, Any] = {}
        self.usable = bool(self.names)
        self.cached = self.triton = 0
        _ALL.append(self)

    def __call__(self, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
        if not (self.usable and enabled()) or _hooks():
            self.triton += 1
            self.fn[grid](*args, **meta)
            return
        try:
            key = (torch.cuda.current_device(), tuple(map(spec, args)), tuple(meta.items()))
            hash(key)
        except TypeError:  # an argument we cannot key (Triton's own path handles it)
            self.triton += 1
            self.fn[grid](*args, **meta)
            return
        kernel = self.kernels.get(key)
        if kernel is None:
            self.triton += 1
            self._first(key, grid, args, meta)
            return
        self.cached += 1
        if os.environ.get("LAYERSTREAM_FAST_LAUNCH_CHECK") == "1":
            own = self.fn.run(*args, grid=grid, warmup=True, **meta)
            assert own is kernel, f"{self.names[0]}...: the kept kernel is not the one Triton picks for this call"
        values = [*args, *(meta[n] for n in self.names[len(args):])]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(key[0])
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *values)

    def _first(self, key: tuple, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
        """Triton's own launch; keep the compiled kernel when the call names every parameter."""
        kernel = self.fn[grid](*args, **meta)
        names_all = len(args) + sum(n in meta for n in self.names[len(args):]) == len(self.names)
        entry_points = all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata"))
        if names_all and entry_points and not hasattr(kernel, "result"):
            self.kernels[key] = kernel
        elif not entry_points:
            self.usable = False


def _hooks() -> bool:
    """Whether Triton launch hooks are installed (they need Triton's own launch metadata)."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover
        return False
    hook = knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))
