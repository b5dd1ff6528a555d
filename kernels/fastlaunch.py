"""A cheaper launch path for Triton kernels launched thousands of times a pass with few specializations.

A launch through ``JITFunction.run`` binds every argument through Triton's specializer, builds a string cache key
from the result, checks the kernel's globals and asks for launch metadata before it calls the compiled kernel's
launcher. A streamed prompt pass of the 7B AWQ on an H200 launches ~3,000 kernels, and that host work is most of
its length: its kernels take 184 ms of a 376 ms pass (session 27, bench/results/2026-12-04-h200-s27/call2; under
cProfile ``JITFunction.run`` and its callees were 36% of the pass's Python).

``FastKernel`` wraps a ``@triton.jit`` function; ``kernel[grid](*args, **kwargs)`` launches as Triton would. The
first launch of a *key* goes through Triton (compiling if needed) and keeps the compiled kernel; later launches
of that key call its launcher directly. The key holds each constexpr and launch option by value and each runtime
argument by what Triton's own binder specializes it on (``native_specialize_impl``: an integer's type and whether
it is 1 or a multiple of 16, a tensor's dtype and 16-byte alignment, a tensor descriptor's dtype and block shape),
and the device: a kernel compiled for one specialization never runs for another, and launches that differ only in
values Triton does not compile for (a pass's token count, a descriptor's shape) share one. A new key costs one
ordinary launch.

Triton's own path is taken while its launch hooks are set (a profiler's), inside ``kernels.ahead.compile_only``
(its launches compile and never run), under the interpreter, for arguments of other kinds, and for a grid given
as a function.

Off unless ``LAYERSTREAM_FAST_LAUNCH=1``. Until session 42 the key held every integer's value and a descriptor's
shape and strides: a served pass, whose token counts are new each time, missed it on most launches and paid the
key and Triton's path both, which may be part of why served passes ran slower with it than without while
in-process bursts, repeating the same lengths, ran faster (below; not yet measured with the new key). Measured
on an H200 (session 28, bench/results/2026-12-04-h200-s28): in process (bench/burst_probe.py, alternated on one machine) the 7B AWQ's 16-prompt burst passes took 265-436 /
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

try:  # Triton >= 3.3: the binder's own specializer
    from triton._C.libtriton import native_specialize_impl as _native
except ImportError:  # pragma: no cover
    _native = None

_MAX_KEYS = 4096  # compiled kernels kept per wrapped function (cleared when full)
STATS = {"direct": 0, "triton": 0}  # launches each way (tests and probes read them)


def _hooked() -> bool:
    """Whether a launch hook is set (Triton 3.6: a function or None; later: a chain of them, maybe empty)."""
    rt = _knobs.runtime
    return any(h is not None and bool(getattr(h, "calls", True)) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


# whether launches may take the direct path (read once; tests and probes set it)
_ENABLED = (os.environ.get("LAYERSTREAM_FAST_LAUNCH", "0") == "1" and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and _knobs is not None)


def _exact_key(a):
    """A constexpr's key: its value and its text (``-0.0`` and ``0.0``, ``(1, 2)`` and ``(True, 2)`` are equal in
    Python but not to Triton's compiler; a tensor never by identity); raises TypeError for unhashable values."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    hash(a)
    return type(a), a, repr(a)


def _spec_key(backend, kp, a):
    """A runtime argument's key: what Triton's own binder specializes it on (``native_specialize_impl`` with the
    parameter's flags: an integer's type and whether it is 1 or a multiple of 16, a tensor's dtype and
    alignment, a tensor descriptor's dtype and block shape), so that launches differing only in values Triton
    does not compile for (a pass's token count) share one compiled kernel."""
    if _native is None:  # pragma: no cover - a Triton without it: the value itself (finer)
        return _exact_key(a)
    if isinstance(a, (list, tuple, dict)):
        raise TypeError(type(a).__name__)
    return _native(backend, a, getattr(kp, "is_const", False), not getattr(kp, "do_not_specialize", False),
                   not getattr(kp, "do_not_specialize_on_alignment", False))


class FastKernel:
    """A ``@triton.jit`` function launched through ``FastKernel[grid](...)`` (see the module docstring)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.kernels: dict = {}
        self.backends: dict = {}  # device -> Triton's backend (the specializer's argument)
        params = getattr(fn, "params", None)
        self.names = [p.name for p in params] if params is not None else None
        self.params = {p.name: p for p in params} if params is not None else {}
        self.defaults = {p.name: p.default for p in params if p.has_default} if params is not None else {}

    def key(self, dev: int, args: tuple, kwargs: dict) -> tuple:
        """The launch's key: each constexpr (and launch option) by value, each runtime argument by what Triton
        specializes it on (:func:`_spec_key`); raises TypeError for an argument of a kind not handled."""
        backend = self.backends.get(dev)
        if backend is None:
            from triton.compiler.compiler import make_backend
            from triton.runtime import driver
            backend = self.backends[dev] = make_backend(driver.active.get_current_target())
        return dev, tuple(self._one(backend, self.names[i], a) for i, a in enumerate(args)), \
            tuple((k, self._one(backend, k, v)) for k, v in kwargs.items())

    def _one(self, backend, name: str, a):
        kp = self.params.get(name)
        return _exact_key(a) if kp is None or kp.is_constexpr else _spec_key(backend, kp, a)

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
            hit = self.kernels.get(key := self.key(dev, args, kwargs))
        except (TypeError, IndexError):  # an argument of another kind, or an unhashable keyword: Triton's path
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
