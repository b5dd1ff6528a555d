"""Compile ahead in worker processes that fill Triton's on-disk cache (used by kernels/ahead.py).

Triton's front end (AST to TTIR, and the Python driving the pass pipeline) holds the GIL, so
compiles started from threads overlap only part of their work. Here a compile is captured where
Triton knows all its inputs -- ``knobs.runtime.jit_cache_hook``, which ``JITFunction._do_compile``
calls with the kernel, its signature, constexprs, attributes and options before compiling, and
whose True answer skips the in-process compile -- and sent as a picklable :class:`CompileJob` to a
pool of *spawned* processes (the parent holds a CUDA context: never forked). A worker imports the
kernel's module, rebuilds the ``ASTSource`` and calls ``triton.compile`` with the parent's target,
options and cache-invalidating environment, which writes the kernel into the shared on-disk cache
(``TRITON_CACHE_DIR``, by default ``~/.triton/cache``). The real launch that follows computes the
same cache key and loads the kernel from disk. The parent computes that key for each job; a worker
whose compile lands under another key reports it as a failure, and that kernel is compiled at its
first launch, as is any job that fails or cannot be shipped (a kernel not importable by name).

The workers (kernels/ahead_pool.py: ``default_workers``, physical cores - 1, at most 16) run
:func:`serve`; they never touch a GPU.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import triton
from triton.compiler import ASTSource, get_cache_key, make_backend
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileJob:
    """One specialisation's compile inputs, picklable; ``cache_key`` is the hash the parent's own
    compile of it will look up (a directory of the on-disk cache)."""
    module: str
    qualname: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: object  # triton.backends.compiler.GPUTarget
    env_vars: dict
    cache_key: str

    @property
    def name(self) -> str:
        return self.qualname.rsplit(".", 1)[-1]


def env_vars() -> dict:
    """The environment variables that enter Triton's cache key, as the parent sees them now."""
    from triton.compiler import compiler

    return dict(compiler.get_cache_invalidating_env_vars())


def resolve(module: str, qualname: str) -> JITFunction:
    """The JITFunction named ``module:qualname`` (unwrapping autotuner / heuristics wrappers)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{module}:{qualname} is a {type(obj).__name__}, not a Triton kernel")
    return obj


def expected_key(fn: JITFunction, signature: dict, constexprs: dict, attrs: dict, options: dict, target,
                 envs: dict) -> str:
    """The cache directory ``triton.compile`` uses for these inputs (what its first lines compute)."""
    src = ASTSource(fn, signature, constexprs, attrs)
    backend = make_backend(target)
    opts = backend.parse_options(dict(options, **src.parse_options()))
    return hashlib.sha256(get_cache_key(src, backend, opts, envs).encode("utf-8")).hexdigest()


def make_job(fn: JITFunction, signature: dict, constexprs: dict, attrs: dict, options: dict, target,
             envs: dict) -> CompileJob | None:
    """The job for one compile, or None when a worker could not rebuild it (a kernel not reachable by
    its module and name, or inputs that do not pickle)."""
    module, qualname = fn.fn.__module__, fn.fn.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        return None
    try:
        if resolve(module, qualname) is not fn:
            return None
        job = CompileJob(module, qualname, dict(signature), dict(constexprs), dict(attrs), dict(options), target,
                         dict(envs), expected_key(fn, signature, constexprs, attrs, options, target, envs))
        pickle.dumps(job)
    except Exception as e:  # noqa: BLE001 - not shippable: compiled in this process instead
        log.debug("compile ahead: %s:%s stays in this process: %s", module, qualname, e)
        return None
    return job


def job_from_hook(fn: JITFunction, compile: dict, envs: dict) -> CompileJob | None:
    """The job for the arguments ``knobs.runtime.jit_cache_hook`` receives (``fn`` is the kernel, ``compile``
    the hook's dict). Options come from the hook's ``specialization_data`` and are parsed again by the
    backend, as Triton's own ``JITFunction.preload`` does; target and backend are the device's."""
    _, _, target, backend, _ = fn.device_caches[compile["device"]]
    data = json.loads(compile["specialization_data"])
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    options = dict(backend.parse_options(raw).__dict__)
    return make_job(fn, compile["signature"], compile["constants"], compile["configs"][0], options, target, envs)


def in_disk_cache(job: CompileJob) -> bool:
    """Whether the on-disk cache already holds the job's kernel (its metadata file)."""
    return get_cache_manager(job.cache_key).get_file(f"{job.name[:150]}.json") is not None


def compile_job(job: CompileJob) -> float:
    """Worker side: compile ``job`` into the on-disk cache; returns the seconds it took. Raises when
    the compile lands under another key than the parent's (the parent would not find it)."""
    t0 = time.perf_counter()
    src = ASTSource(resolve(job.module, job.qualname), job.signature, job.constexprs, job.attrs)
    kernel = triton.compile(src, target=job.target, options=job.options, _env_vars=job.env_vars)
    if kernel.hash != job.cache_key:
        raise RuntimeError(f"cache key differs from the parent's ({kernel.hash[:12]} vs {job.cache_key[:12]})")
    return time.perf_counter() - t0


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads counted once); os.cpu_count() when unknown."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                cores.add((f.read().strip(), core))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def default_workers() -> int:
    """Worker processes for a pool: physical cores - 1 (the parent's dry pass keeps one), 1 to 16."""
    return max(1, min(physical_cores() - 1, 16))


def warm_key_in_background() -> None:
    """Compute Triton's own key (a hash of its files, ~0.5 s the first time; part of every cache key) in a
    daemon thread, so the first captured compile does not wait for it (hashing releases the GIL)."""
    from triton.runtime.cache import triton_key

    threading.Thread(target=triton_key, daemon=True, name="triton-key").start()


def cache_looks_cold() -> bool:
    """Whether Triton's on-disk cache directory is absent or empty (a fresh machine)."""
    try:
        with os.scandir(triton.knobs.cache.dir) as entries:
            return next(entries, None) is None
    except OSError:
        return True


def serve(read_fd: int, write_fd: int, modules: str) -> None:
    """A worker process's main loop (kernels/ahead_pool.py starts it): import the kernel modules, say
    ready, then compile each ``(id, CompileJob)`` received and answer ``(id, ok, seconds or error)``,
    until the parent closes the pipe (it exited, or shut the pool down)."""
    jobs, answers = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    for m in filter(None, modules.split(",")):
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - a job that needs it fails and says why
            log.warning("compile-ahead worker: importing %s failed: %s", m, e)
    answers.send(("ready", True, os.getpid()))
    while True:
        try:
            job_id, job = jobs.recv()
        except (EOFError, OSError):
            return
        try:
            answers.send((job_id, True, compile_job(job)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, whose real launch compiles it
            answers.send((job_id, False, f"{type(e).__name__}: {e}"[:500]))
