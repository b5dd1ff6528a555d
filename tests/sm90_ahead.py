"""Compile ahead in processes on a machine without a GPU: Triton compiles this repo's kernels for sm_90 with
its bundled ptxas. Run in a subprocess with ``TRITON_INTERPRET=0`` and a fresh ``TRITON_CACHE_DIR``
(tests/test_compile_ahead_procs.py; the test process itself runs kernels in the interpreter).

A stand-in driver answers what ``JITFunction.run`` asks the CUDA driver (device 0, stream 0, target
sm_90), so Triton's own binder, specialisation, ``_do_compile`` and ``jit_cache_hook`` run as on a GPU
(with CPU tensors: only their dtype and address are read). Each function prints one JSON line.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from kernels import ahead_pool, ahead_procs
from kernels.ahead import compile_only
from kernels.rmsnorm import _rmsnorm_kernel

TARGET = GPUTarget("cuda", 90, 32)


class StandInDriver:
    """What JITFunction.run and its binder ask the active driver, answered for an sm_90 device."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def launcher_cls(self, src, metadata) -> None:
        """Compile ahead builds each kernel's launcher (kernels/launchers.py); none can be built without
        the CUDA driver's library, so this one is a no-op."""


def launches(n: int) -> list[tuple]:
    """``n`` distinct rmsnorm specialisations (dtype x block sizes x warps), each as (grid, args, kwargs)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for block_n in (64, 128, 256, 512):
            for block_r, warps in ((1, 4), (4, 8)):
                x = torch.zeros(64, dtype=dtype)
                args = (x, x, x, 4, 1, 1, 64, 64, 64, 64, 1e-6)
                out.append(((4,), args, {"BLOCK_R": block_r, "BLOCK_N": block_n, "num_warps": warps}))
    assert n <= len(out)
    return out[:n]


class Listener:
    """knobs.compilation.listener: counts compiles that hit and missed the on-disk cache."""

    def __init__(self) -> None:
        self.hits = self.misses = 0

    def __call__(self, *, cache_hit: bool, **_) -> None:
        if cache_hit:
            self.hits += 1
        else:
            self.misses += 1


def cache_dirs() -> int:
    return sum(1 for _ in Path(triton.knobs.cache.dir).iterdir()) if Path(triton.knobs.cache.dir).exists() else 0


def real_pass(cases: list[tuple]) -> dict:
    """What a pass after compile_only does: each launch compiles (warm-up: no kernel runs) in this process."""
    listener = Listener()
    triton.knobs.compilation.listener = listener
    t0 = time.perf_counter()
    for grid, args, kwargs in cases:
        _rmsnorm_kernel.run(*args, grid=grid, warmup=True, **kwargs)
    triton.knobs.compilation.listener = None
    return {"hits": listener.hits, "misses": listener.misses, "seconds": time.perf_counter() - t0}


def capture(n: int, workers: int, how: str = "processes") -> None:
    """compile_only over n specialisations (each launched twice), then the real pass. The time of the
    compile_only block includes the workers' start (they are started just before it)."""
    driver.set_active(StandInDriver())
    cases = launches(n)
    if how.startswith("processes"):
        pool = ahead_pool.start_pool(workers)
        if how == "processes-ready":  # time the compiles only, not the workers' start
            assert pool.wait_ready(120)
    listener = Listener()  # compiles in this process during the block (in threads): loads, or compiles
    triton.knobs.compilation.listener = listener
    t0, cpu0 = time.perf_counter(), time.process_time()
    with compile_only(workers=workers, how=how.split("-")[0]) as stats:
        for grid, args, kwargs in cases + cases:
            assert _rmsnorm_kernel[grid](*args, **kwargs) is None
        dispatch = time.perf_counter() - t0  # the calling thread's share: binding, capture, hand-off
    ahead, cpu = time.perf_counter() - t0, time.process_time() - cpu0  # cpu: this process's threads only
    triton.knobs.compilation.listener = None
    dirs = cache_dirs()
    real = real_pass(cases)
    print(json.dumps({"launches": stats.launches, "compiles": stats.compiles, "in_processes": stats.in_processes,
                      "on_disk": stats.on_disk, "launchers": stats.launchers, "failures": stats.failures, "worker_failures": stats.worker_failures,
                      "ahead_hits": listener.hits, "ahead_misses": listener.misses, "ahead_s": ahead, "dispatch_s": dispatch, "parent_cpu_s": cpu, "dirs_after_ahead": dirs,
                      "dirs_after_real": cache_dirs(), "real": real}))


def serial(n: int) -> None:
    """The same n specialisations compiled one after another in this process (today's first pass)."""
    driver.set_active(StandInDriver())
    print(json.dumps({"real": real_pass(launches(n)), "dirs": cache_dirs()}))


def inputs(warps: int) -> tuple[dict, dict, dict, dict]:
    """An rmsnorm specialisation's compile inputs as written by hand (bf16 pointers, BLOCK_N 256)."""
    names = _rmsnorm_kernel.arg_names
    meta = {"BLOCK_R": 4, "BLOCK_N": 256}
    sig = {a: "constexpr" if a in meta else "*bf16" if a.endswith("_ptr") else "fp32" if a == "eps" else "i32"
           for a in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ("x_ptr", "w_ptr", "out_ptr", "N")}
    options = dict(triton.compiler.make_backend(TARGET).parse_options({"num_warps": warps}).__dict__)
    return sig, {(names.index(a),): v for a, v in meta.items()}, attrs, options


def worker() -> None:
    """A job compiled by a spawned worker, then the same inputs compiled here (a hit) and with other
    options (a miss); a job whose expected key was altered (the worker must refuse it)."""
    sig, constexprs, attrs, options = inputs(4)
    job = ahead_procs.make_job(_rmsnorm_kernel, sig, constexprs, attrs, options, TARGET, ahead_procs.env_vars())
    pool = ahead_pool.start_pool(1)
    worker_s = pool.submit(job).result()
    dirs = cache_dirs()
    listener = Listener()
    triton.knobs.compilation.listener = listener
    t0 = time.perf_counter()
    same = triton.compile(triton.compiler.ASTSource(_rmsnorm_kernel, sig, constexprs, attrs), target=TARGET,
                          options=options)
    hit_s = time.perf_counter() - t0
    other = inputs(8)
    triton.compile(triton.compiler.ASTSource(_rmsnorm_kernel, *other[:3]), target=TARGET, options=other[3])
    triton.knobs.compilation.listener = None
    bad = dataclasses.replace(job, cache_key="0" * 64)
    try:
        pool.submit(bad).result()
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    print(json.dumps({"job_key": job.cache_key, "parent_hash": same.hash, "worker_s": worker_s, "hit_s": hit_s,
                      "dirs_after_worker": dirs, "dirs_after_parent": cache_dirs(), "hits": listener.hits,
                      "misses": listener.misses, "refused": refused, "in_disk_cache": ahead_procs.in_disk_cache(job)}))


if __name__ == "__main__":
    what, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0
    how = sys.argv[4] if len(sys.argv) > 4 else "processes"
    {"capture": lambda: capture(n, workers, how), "serial": lambda: serial(n), "worker": worker}[what]()
