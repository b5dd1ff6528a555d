"""A cheaper launch path for Triton kernels launched thousands of times a pass with few specializations.

A launch through ``JITFunction.run`` binds every argument through Triton's specializer, builds a string cache key
from the result, checks the kernel's globals and asks for launch metadata before it calls the compiled kernel's
launcher. A streamed prompt pass of the 7B AWQ on an H200 launches ~3,000 kernels, and that host work is most of
its length: its kernels take 184 ms of a 376 ms pass (session 27, bench/results/2026-12-04-h200-s27/call2; under
cProfile ``JITFunction.run`` and its callees were 36% of the pass's Python).

``FastKernel`` wraps a ``@triton.jit`` function; ``kernel[grid](*args, **kwargs)`` launches as Triton would. The
first launch of a *key* goes through Triton (compiling if needed) and keeps the compiled kernel; later launches
of that key call its launcher directly. The key holds everything Triton specializes on, exactly or more finely:
each integer's and float's value, each tensor's dtype and whether its address is 16-byte aligned, a tensor
descriptor's base (the same), shape, strides and block shape, every keyword (constexprs and launch options) and
the device. So a kernel compiled for one specialization never runs for another; a new key costs one ordinary
launch.

Triton's own path is taken while its launch hooks are set (a profiler's), inside ``kernels.ahead.compile_only``
(its launches compile and never run), under the interpreter, for arguments of other kinds, and for a grid given
as a function.

Off unless ``LAYERSTREAM_FAST_LAUNCH=1``. Measured on an H200 (session 28, bench/results/2026-12-04-h200-s28):
in process (bench/burst_probe.py, alternated on one machine) the 7B AWQ's 16-prompt burst passes took 265-436 /
441-685 ms with it and ``engine.stacking``'s packing against 453-621 / 698-893 ms without; but served
(tools/bench_serve, 16 clients, new / old / new processes on one machine) the burst's passes took 422-427 /
689-698 ms with both against 283 / 485 ms without, and nothing measured there tells which of the two, or what
in the server, made them slower. Session 29 (bench/results/2026-12-04-h200-s29, bench/ab_serve.sh) served each
alone against the defaults: slower in every pair (direct launches 918 ms against 497 for the burst's first pass),
and bench/probe_fastlaunch.py found the direct call saving only 10-15% of a launch's host time. The default is
Triton's path.
"""

from __future__ import annotations

import os

import torch

try:  # Triton >= 3.4: the launch hooks live in knobs
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: never fast
    _knobs = None

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover
    JITFunction = None
_RUN = getattr(JITFunction, "run", None)  # Triton's own; kernels.ahead.compile_only patches it (no launch inside)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - Triton without host tensor descriptors
    TensorDescriptor = None

_MAX_KEYS = 4096  # compiled kernels kept per wrapped function (cleared when full)
STATS = {"direct": 0, "triton": 0}  # launches each way (tests and probes read them)


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.6: a function or None; later: a chain of them, maybe empty)."""
    rt = _knobs.runtime
    return any(h is not None and bool(getattr(h, "calls", True)) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


# whether launches may take the direct path (read once; tests and probes set it)
_ENABLED = (os.environ.get("LAYERSTREAM_FAST_LAUNCH", "0") == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and _knobs is not None)


def _arg_key(a):
    """What Triton specializes an argument on (or finer); raises TypeError for kinds it does not handle."""
    t = type(a)
    if t is int:
        return a
    if t is bool or a is None or t is str or t is float:  # a float's value: it may be a constexpr
        return (t, a)
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if TensorDescriptor is not None and t is TensorDescriptor:
        base = a.base
        return (TensorDescriptor, base.dtype, base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides),
                tuple(a.block_shape), getattr(a, "padding", None))
    raise TypeError(type(a).__name__)


def _kw_key(v):
    """A keyword's key: as a positional argument's, or for a constexpr of another hashable kind (a dtype, a
    tuple) its value; a tensor never by identity."""
    try:
        return _arg_key(v)
    except TypeError:
        hash(v)
        return (type(v), v)


class FastKernel:
    """A ``@triton.jit`` function launched through ``FastKernel[grid](...)`` (see the module docstring)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.kernels: dict = {}
        params = getattr(fn, "params", None)
        self.names = [p.name for p in params] if params is not None else None
        self.defaults = {p.name: p.default for p in params if p.has_default} if params is not None else {}

    def __getitem__(self, grid):
        if not _ENABLED:  # off: Triton's own launch, nothing in between
            return self.fn[grid]
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict):
        """Launch over ``grid`` (a tuple of 1-3 ints); returns what Triton's launch returns on its path."""
        if not _ENABLED or not self.names or type(grid) is not tuple or JITFunction.run is not _RUN or _hooked():
            return self._triton(grid, args, kwargs)
        dev = torch.cuda.current_device()
        try:
            key = (dev, tuple(map(_arg_key, args)), tuple((k, _kw_key(v)) for k, v in kwargs.items()))
            hit = self.kernels.get(key)
        except TypeError:  # an argument of another kind, or an unhashable keyword: Triton's path
            return self._triton(grid, args, kwargs)
        if hit is None:
            return self._first(key, grid, args, kwargs)
        kernel, run, function, metadata = hit
        full = self._full(args, kwargs)
        n = len(grid)
        STATS["direct"] += 1
        # launch metadata and both hooks None: what Triton passes when no hook is set
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, torch._C._cuda_getCurrentRawStream(dev),
            function, metadata, None, None, None, *full)
        return kernel

    def _full(self, args: tuple, kwargs: dict) -> list:
        """Every parameter's value in declaration order (what Triton's binder hands the launcher)."""
        names, defaults = self.names, self.defaults
        return list(args) + [kwargs[k] if k in kwargs else defaults[k] for k in names[len(args):]]

    def _first(self, key, grid, args: tuple, kwargs: dict):
        kernel = self._triton(grid, args, kwargs)
        if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")) and not hasattr(kernel, "result") \
                and len(args) <= len(self.names) and all(k in kwargs or k in self.defaults or i < len(args)
                                                         for i, k in enumerate(self.names)):
            if len(self.kernels) >= _MAX_KEYS:
                self.kernels.clear()
            self.kernels[key] = (kernel, kernel.run, kernel.function, kernel.packed_metadata)
        return kernel

    def _triton(self, grid, args: tuple, kwargs: dict):
        STATS["triton"] += 1
        return self.fn[grid](*args, **kwargs)


def fast(fn) -> FastKernel:
    """``fn`` (a ``@triton.jit`` function) behind :class:`FastKernel`."""
    return FastKernel(fn)
