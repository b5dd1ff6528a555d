"""The process-wide pool of compile-ahead workers (kernels/ahead_procs.py compiles; this runs them).

Each worker is a fresh interpreter (``python -c "...serve(...)"``), neither forked (the parent holds a
CUDA context) nor started by multiprocessing's spawn (which re-imports the parent's ``__main__``: a
user script without a main guard would run again in every worker). It gets two pipes of its own,
``CUDA_VISIBLE_DEVICES`` empty (compiling needs no GPU; a context would cost GPU memory) and the
parent's ``TRITON_CACHE_DIR``; it imports the kernel modules the parent has loaded and then compiles
the jobs it is sent. It exits when its jobs pipe closes: at :func:`shutdown_pool`, or when the parent
exits in any way (the kernel closes the parent's pipe ends). One thread per worker in the parent feeds
it from a shared queue, so a free worker takes the next job. A worker that dies fails its job; when
none is left the queued jobs fail too and the pool is not used again (compiles go to threads).
Each worker holds ~150 MB of private memory (CPU torch 2.13 and triton 3.9 imported), so a pool that
had nothing to compile for ``LINGER_S`` seconds stops; the next compile missing from the on-disk
cache starts a new one.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path

import triton

from kernels.ahead_procs import CompileJob, default_workers

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_POOL: WorkerPool | None = None
_FAILED = False  # a pool that could not start, or lost all its workers, is not started again
LINGER_S = 120.0  # an idle pool stops after this long (it may start before a long weight load)


class WorkerPool:
    """``workers`` compile processes fed from one queue; :meth:`submit` returns a Future of the seconds a
    compile took (or its error)."""

    def __init__(self, workers: int) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.alive = 0
        self.pending = 0  # jobs submitted and not finished
        self.ready = threading.Semaphore(0)  # released once per worker that finished its imports
        self.last_use = time.monotonic()
        self.procs: list[subprocess.Popen] = []
        modules = ",".join(sorted(m for m in sys.modules if m.startswith("kernels.") and "ahead" not in m))
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_CACHE_DIR": str(triton.knobs.cache.dir),
               "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        try:
            for _ in range(workers):
                self._start(env, modules)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, env: dict, modules: str) -> None:
        job_r, job_w = os.pipe()
        ans_r, ans_w = os.pipe()
        code = f"from kernels.ahead_procs import serve; serve({job_r}, {ans_w}, {modules!r})"
        try:
            proc = subprocess.Popen([sys.executable, "-c", code], env=env, pass_fds=(job_r, ans_w),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(job_r)
            os.close(ans_w)
        jobs, answers = Connection(job_w, readable=False), Connection(ans_r, writable=False)
        self.procs.append(proc)
        self.alive += 1
        threading.Thread(target=self._feed, args=(proc, jobs, answers), daemon=True, name="compile-feed").start()

    def _feed(self, proc: subprocess.Popen, jobs: Connection, answers: Connection) -> None:
        """One worker's thread: wait for it to be ready, then send it queued jobs one at a time."""
        item = None
        try:
            answers.recv()  # ("ready", True, pid): its imports are done
            self.ready.release()
            while (item := self.jobs.get()) is not None:
                job, fut = item
                jobs.send((id(fut), job))
                _, ok, value = answers.recv()
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(RuntimeError(value))
                item = None
        except (EOFError, OSError) as e:
            if item is not None:
                item[1].set_exception(RuntimeError(f"compile worker {proc.pid} exited ({e or 'pipe closed'})"))
        finally:
            jobs.close()
            answers.close()
            self._lost()

    def _lost(self) -> None:
        with self.lock:
            self.alive -= 1
            if self.alive > 0:
                return
        while True:  # no worker left: nothing queued will be compiled here
            try:
                item = self.jobs.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(RuntimeError("no compile worker left"))

    def submit(self, job: CompileJob) -> Future | None:
        """Queue ``job``; None when no worker is left."""
        fut: Future = Future()
        with self.lock:
            if self.alive <= 0:
                return None
            self.jobs.put((job, fut))
            self.pending += 1
            self.last_use = time.monotonic()
        fut.add_done_callback(self._done)
        return fut

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker has imported its modules (for measurements); False on timeout."""
        deadline = time.monotonic() + timeout
        return all(self.ready.acquire(timeout=max(0.0, deadline - time.monotonic())) for _ in self.procs)

    def _done(self, _: Future) -> None:
        with self.lock:
            self.pending -= 1
            self.last_use = time.monotonic()

    def idle_for(self) -> float:
        """Seconds since the last job was submitted or finished; 0 while jobs are pending."""
        with self.lock:
            return 0.0 if self.pending else time.monotonic() - self.last_use

    def shutdown(self) -> None:
        """Stop every worker (each finishes its current compile, then reads the end of its pipe)."""
        for _ in self.procs:
            self.jobs.put(None)


def start_pool(workers: int | None = None) -> WorkerPool | None:
    """The process-wide pool, started (workers importing in the background) if it is not yet; None when
    worker processes cannot be started here (logged once; callers compile in threads)."""
    global _POOL, _FAILED
    with _LOCK:
        if _POOL is None and not _FAILED:
            n = workers or default_workers()
            try:
                _POOL = WorkerPool(n)
                log.info("compile ahead: %d worker processes starting", n)
                threading.Thread(target=_reap, args=(_POOL,), daemon=True, name="compile-reap").start()
            except Exception as e:  # noqa: BLE001 - no processes here: threads instead
                _FAILED = True
                log.warning("compile ahead: cannot start worker processes (%s); compiling in threads", e)
        return _POOL


def submit(job: CompileJob) -> Future | None:
    """Hand ``job`` to the pool (started if needed); None when there is no usable pool."""
    global _FAILED
    pool = start_pool()
    fut = pool.submit(job) if pool is not None else None
    if pool is not None and fut is None:
        _FAILED = True
        log.warning("compile ahead: no compile worker left; compiling in threads")
    return fut


def _reap(pool: WorkerPool) -> None:
    """Stop ``pool`` once it has been idle for LINGER_S (or return when it is no longer the pool)."""
    while _POOL is pool:
        if pool.idle_for() >= LINGER_S:
            with _LOCK:
                if _POOL is not pool or pool.idle_for() < LINGER_S:
                    continue
            shutdown_pool()
            log.info("compile ahead: worker processes stopped after %.0f s idle", LINGER_S)
            return
        time.sleep(min(5.0, LINGER_S / 4))


def shutdown_pool() -> None:
    """Stop the workers; a later :func:`start_pool` starts new ones."""
    global _POOL
    with _LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.shutdown()


atexit.register(shutdown_pool)
