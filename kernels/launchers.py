"""Build a compiled Triton kernel's launcher ahead of its first launch.

Triton 3.6 (the version on the GPU machine) generates a C launcher for each kernel signature, and
compiles it with the system's C compiler into its cache the first time a kernel of that signature is
launched, on the launching thread. A warm-up compile (``run(..., warmup=True)``, what compile ahead
does: kernels/ahead.py) compiles the kernel but not its launcher. On a fresh machine each distinct
launcher thus cost a C compile inside the first real pass: 0.22-0.35 s a launcher of 5-16 arguments
(``gcc -O3 -c`` alone, this repo's 2-core CI machine: bench/probe_launcher_compile.py,
bench/results/2026-12-02-cpu-launcher-compile/), one after another on the main thread. Built in
compile ahead's pool instead, the first launch finds it in Triton's cache (keyed by its source) and
only loads it. Newer Triton versions generate no per-signature C code; building one there is cheap.
"""
from __future__ import annotations


def prebuild_launcher(kernel) -> bool:
    """Build the launcher of ``kernel`` (a ``CompiledKernel`` a warm-up returned) into Triton's cache,
    unless it has one already; returns whether it built one. Anything else (None, a stand-in) is left."""
    src, metadata = getattr(kernel, "src", None), getattr(kernel, "metadata", None)
    if src is None or metadata is None or getattr(kernel, "_run", None) is not None:
        return False
    from triton.runtime import driver

    driver.active.launcher_cls(src, metadata)
    return True
