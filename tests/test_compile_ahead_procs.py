"""Compile ahead in worker processes (kernels/ahead_procs.py and its routing in kernels/ahead.py).

Fast tests drive the routing with a stand-in for ``JITFunction.run`` that calls Triton's
``jit_cache_hook`` as ``_do_compile`` does. The slow ones compile this repo's rmsnorm kernel for sm_90
on the CPU in a subprocess (tests/sm90_ahead.py: Triton's real binder, hook and on-disk cache, with a
stand-in driver) in a fresh TRITON_CACHE_DIR. The GPU test runs an engine's first run with processes
and counts the compiles that missed the on-disk cache outside the dry passes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import triton
from triton.runtime.jit import JITFunction

from kernels import ahead_pool, ahead_procs
from kernels.ahead import compile_only, mode

ROOT = Path(__file__).resolve().parents[1]


def _body(x_ptr, n, BLOCK):  # never compiled here: only its JITFunction wrapper is used
    pass


module_kernel = JITFunction(_body)


class HookCaller:
    """Stands in for JITFunction.run: a warm-up calls the jit_cache_hook (as _do_compile does) and compiles
    (records) unless it answers True; records (thread, warmup) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.lock = threading.Lock()

    def __call__(self, fn, *args, grid, warmup, **kwargs):
        hook = triton.knobs.runtime.jit_cache_hook
        skipped = hook is not None and hook(key="k", repr="r", fn=type("Info", (), {"jit_function": fn}),
                                            compile={"device": 0}, is_manual_warmup=warmup, already_compiled=False)
        with self.lock:
            self.calls.append((threading.get_ident(), skipped))
        return None if skipped else "kernel"


def _done(value=1.0) -> Future:
    f = Future()
    f.set_result(value)
    return f


@pytest.mark.parametrize("case", ["job", "worker_fails", "on_disk", "no_pool", "no_job"])
def test_routing(monkeypatch, case):
    """A captured job goes to a worker process unless on disk; either way a thread then loads the kernel
    (after the worker: a failed worker compile is recorded and the thread compiles it). No pool, or no
    job: the thread compiles it."""
    caller = HookCaller()
    monkeypatch.setattr(JITFunction, "run", caller)
    monkeypatch.setattr(ahead_procs, "job_from_hook", lambda fn, compile, envs: None if case == "no_job" else "job")
    monkeypatch.setattr(ahead_procs, "in_disk_cache", lambda job: case == "on_disk")
    worker = Future()
    monkeypatch.setattr(ahead_pool, "submit", lambda job: None if case == "no_pool" else worker)
    previous = lambda **kw: False  # noqa: E731 - a user's hook, kept for every other compile
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", previous)
    buf = torch.zeros(64)
    with compile_only(how="processes") as stats:
        for _ in range(3):
            assert module_kernel[(1,)](buf, 32, BLOCK=16) is None
        time.sleep(0.05)
        assert len(caller.calls) == 1 or case in ("on_disk", "no_pool", "no_job")  # the thread waits for the worker
        if case == "worker_fails":
            worker.set_exception(RuntimeError("cache key differs"))
        else:
            worker.set_result(0.5)
    assert triton.knobs.runtime.jit_cache_hook is previous  # restored
    assert (stats.launches, stats.compiles, stats.failures) == (3, 1, [])
    assert stats.in_processes == (case in ("job", "worker_fails")) and stats.on_disk == (case == "on_disk")
    assert len(stats.worker_failures) == (case == "worker_fails")
    me = threading.get_ident()
    assert caller.calls[0] == (me, True)  # the warm-up here: captured, not compiled
    assert len(caller.calls) == 2 and caller.calls[1][0] != me and caller.calls[1][1] is False  # then a thread's


def test_mode(monkeypatch):
    for value, want in [("0", "off"), ("threads", "threads"), ("processes", "processes"), ("1", "threads"),
                        ("bogus", "threads")]:
        monkeypatch.setenv("LAYERSTREAM_COMPILE_AHEAD", value)
        assert mode() == want
    monkeypatch.delenv("LAYERSTREAM_COMPILE_AHEAD")
    assert mode() == "threads"  # processes become the default once measured on a GPU


def test_workers_are_bounded():
    assert 1 <= ahead_procs.physical_cores() <= (os.cpu_count() or 1)
    assert ahead_procs.default_workers() == max(1, min(ahead_procs.physical_cores() - 1, 16))


def test_only_kernels_reachable_by_name_are_shipped():
    local = JITFunction(_body)  # a <locals> qualname: a worker could not import it
    assert ahead_procs.make_job(local, {}, {}, {}, {}, None, {}) is None
    assert ahead_procs.resolve(__name__, "module_kernel") is module_kernel
    wrapper = type("Autotuner", (), {"fn": module_kernel})()
    globals()["wrapped_kernel"] = wrapper
    assert ahead_procs.resolve(__name__, "wrapped_kernel") is module_kernel
    with pytest.raises(TypeError, match="not a Triton kernel"):
        ahead_procs.resolve(__name__, "_done")


def _sm90(tmp_path: Path, *argv: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton"), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "tests.sm90_ahead", *argv], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_worker_compiles_under_the_parents_key(tmp_path):
    """A spawned worker's compile is what the parent's later compile of the same inputs loads: same
    hash, one cache directory, a listener-reported hit; other options miss; a job whose expected key
    differs from the worker's compile is refused."""
    got = _sm90(tmp_path, "worker", "0")
    assert got["job_key"] == got["parent_hash"] and got["in_disk_cache"]
    assert (got["hits"], got["misses"]) == (1, 1)  # the same inputs hit, num_warps=8 missed
    assert (got["dirs_after_worker"], got["dirs_after_parent"]) == (1, 2)
    assert got["hit_s"] < got["worker_s"] / 5
    assert "cache key differs" in got["refused"]


@pytest.mark.slow
def test_capture_leaves_the_real_pass_nothing_to_compile(tmp_path):
    """compile_only with processes over 4 rmsnorm specialisations (each launched twice): all 4 are sent
    to 2 workers, threads here load them from the on-disk cache, and the real pass compiles nothing."""
    got = _sm90(tmp_path, "capture", "4", "2")
    assert (got["launches"], got["compiles"], got["in_processes"], got["on_disk"]) == (8, 4, 4, 0)
    assert got["failures"] == [] and got["worker_failures"] == [] and got["launchers"] == 4  # one per kernel
    assert (got["ahead_hits"], got["ahead_misses"]) == (4, 0)  # this process only loaded them from disk
    assert (got["real"]["misses"], got["real"]["hits"]) == (0, 0)  # and the real pass found them loaded
    assert got["dirs_after_ahead"] == got["dirs_after_real"] == 4


PARENT = """
import os
from kernels import ahead_pool, ahead_procs
pool = ahead_pool.start_pool(1)
job = ahead_procs.CompileJob("no_such_module", "k", {}, {}, {}, {}, None, {}, "0" * 64)
try:
    pool.submit(job).result()
except RuntimeError as e:
    print(e, flush=True)
print(pool.procs[0].pid, flush=True)
os._exit(0)  # no shutdown, no atexit: as a killed parent
"""


@pytest.mark.slow
def test_workers_exit_with_their_parent():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", PARENT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ModuleNotFoundError" in run.stdout  # the worker ran, failed the job and said why
    pid = int(run.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.slow
def test_an_idle_pool_stops(monkeypatch):
    monkeypatch.setattr(ahead_pool, "LINGER_S", 0.5)
    pool = ahead_pool.start_pool(1)
    try:
        assert pool is not None and ahead_pool.start_pool() is pool  # one pool per process
        assert pool.procs[0].wait(timeout=60) is not None  # stopped: its jobs pipe was closed
        assert ahead_pool._POOL is None
    finally:
        ahead_pool.shutdown_pool()


def gpu_first_run(model_dir: str) -> None:
    """An engine's first run with compile ahead in processes (a GPU, a fresh TRITON_CACHE_DIR, untuned
    picks so the real pass launches what the dry passes saw); prints the compiles that missed the
    on-disk cache outside the dry passes, and the dry passes' stats."""
    import contextlib

    from engine.generate import generate
    from engine.sampling import SamplingParams
    from kernels import ahead as kernels_ahead, tuning_cache
    from kernels.tuning import untuned
    from tests.helpers import make_engine, random_prompts

    tuning_cache.has_entries = lambda device: True
    inside, misses, hits, stats = [False], [], [], []
    compile_only_real = kernels_ahead.compile_only

    @contextlib.contextmanager
    def watched(*args, **kwargs):
        inside[0] = True
        try:
            with compile_only_real(*args, **kwargs) as s:
                yield s
        finally:
            inside[0] = False
        stats.append(s)

    kernels_ahead.compile_only = watched
    triton.knobs.compilation.listener = lambda *, src, cache_hit, **_: (hits if cache_hit else misses).append(
        (src.name, inside[0]))
    with untuned():
        eng = make_engine(Path(model_dir), device="cuda", kernels="triton", batch=2, prefill_chunk=16)
        try:
            generate(eng, random_prompts([37, 5], 100, seed=4), SamplingParams(temperature=0.0), max_new_tokens=8)
        finally:
            eng.close()
    print(json.dumps({"misses_outside": [n for n, ins in misses if not ins], "hits_outside": sum(not i for _, i in hits),
                      "in_processes": sum(s.in_processes for s in stats), "failures": [f for s in stats for f in s.failures],
                      "worker_failures": [f for s in stats for f in s.worker_failures]}))


@pytest.mark.cuda
def test_gpu_first_run_compiles_nothing_after_the_dry_passes(tmp_path, tokenizer_dir):
    from tests.helpers import make_hf_model

    _, model_dir = make_hf_model("qwen2", tmp_path, tokenizer_dir=tokenizer_dir)
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "LAYERSTREAM_COMPILE_AHEAD": "processes",
           "PYTHONPATH": str(ROOT), "LAYERSTREAM_TUNING_CACHE": "0"}
    code = f"from tests.test_compile_ahead_procs import gpu_first_run; gpu_first_run({str(model_dir)!r})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["failures"] == [] and got["worker_failures"] == [] and got["in_processes"] > 0
    assert got["misses_outside"] == [], got  # no real launch compiled (a load from disk at most)
