"""The host lane's worker thread and the CPU cores it runs on.

A decode step's host layers (``engine.host_lane``) run on one dedicated thread, so torch's
intra-op threads for them can be pinned to cores of their own: the worker is pinned to every
physical core but the first few, which are left to the threads the streamer keeps busy while a
decode step runs, and torch's intra-op thread count on the worker is one per pinned physical core
(threads of one core's SMT siblings would share its load ports, and a host GEMV is bound by
memory reads, not arithmetic). The OpenMP threads the worker's torch calls start inherit its
affinity; the main thread keeps its own count (torch's count is per thread once a thread has
used it, so the main thread's is fixed before the worker changes it).

What the streamer keeps busy at decode time: the main thread (it launches the GPU work and issues
the copies: one core), and with a disk tier the disk reader (``streamer.host.DiskReader``), whose
reads ``streamer.files.SpanReader`` splits over its pool: those threads wait on the drive, but the
page-cache copies of a few GB/s take about one more core. The loading threads (the read pool at
load time) are idle by the time a decode step runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.interrupts import ctrl_c_after

log = logging.getLogger(__name__)

MAIN_THREAD_CORES = 1  # launches the GPU work and issues the streamer's copies
DISK_READER_CORES = 1  # page-cache copies of the disk tier's reads


@dataclass(frozen=True)
class CorePick:
    """The worker's CPUs (logical ids; empty: not pinned) and torch's intra-op thread count on it."""

    cpus: tuple[int, ...]
    threads: int
    physical: int  # physical cores allowed to this process
    reserved: int  # of them, left to the streamer's threads

    def describe(self) -> str:
        """One line for the plan text and the log."""
        if not self.cpus:
            return (f"host lane worker: {self.threads} torch thread(s), not pinned ({self.physical} physical "
                    f"core(s), {self.reserved} wanted for the main thread and the streamer)")
        return (f"host lane worker: {self.threads} torch threads pinned to CPUs {cpu_ranges(self.cpus)} "
                f"(one per physical core; {self.reserved} of {self.physical} physical cores left to the main "
                "thread and the streamer)")


def cpu_ranges(cpus: Iterable[int]) -> str:
    """``0-3,8,10-11`` for CPUs 0, 1, 2, 3, 8, 10, 11."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def reserved_cores(disk_tier: bool) -> int:
    """Physical cores the streamer keeps busy during a decode step (module docstring)."""
    return MAIN_THREAD_CORES + (DISK_READER_CORES if disk_tier else 0)


def pick_cores(allowed: Iterable[int], core_of: Mapping[int, tuple[int, int]], reserved: int) -> CorePick:
    """The worker's cores: of the physical cores holding the ``allowed`` logical CPUs (``core_of``:
    CPU -> (package, core); a CPU missing there is a core of its own), all but the ``reserved``
    lowest-numbered ones, with every allowed sibling of each; one torch thread per physical core.
    With no core left over the worker is not pinned and runs one thread."""
    assert reserved >= 0, reserved
    cores: dict[tuple, list[int]] = {}
    for cpu in sorted(set(allowed)):
        cores.setdefault(core_of.get(cpu, (-1, -1 - cpu)), []).append(cpu)
    ordered = sorted(cores.values(), key=min)
    chosen = ordered[reserved:]
    if not chosen:
        return CorePick((), 1, len(ordered), reserved)
    return CorePick(tuple(sorted(c for core in chosen for c in core)), len(chosen), len(ordered), reserved)


def cpu_topology(root: Path = Path("/sys/devices/system/cpu")) -> dict[int, tuple[int, int]]:
    """CPU -> (package, core) from sysfs (Linux); empty where it cannot be read."""
    out: dict[int, tuple[int, int]] = {}
    for d in root.glob("cpu[0-9]*"):
        try:
            topo = d / "topology"
            out[int(d.name[3:])] = (int((topo / "physical_package_id").read_text()),
                                    int((topo / "core_id").read_text()))
        except (OSError, ValueError):
            continue
    return out


def machine_pick(disk_tier: bool) -> CorePick:
    """:func:`pick_cores` for this process's allowed CPUs and this machine's topology."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return pick_cores(allowed, cpu_topology(), reserved_cores(disk_tier))


class HostWorker:
    """One thread that runs submitted calls in order, pinned and with torch's thread count per ``pick``,
    under ``torch.no_grad`` (normal tensors: the callers may update results in place)."""

    def __init__(self, pick: CorePick, name: str = "host-lane") -> None:
        saved = torch.get_num_threads()  # fixes the calling thread's own count before the worker sets its own
        self.pick = pick
        self.pinned = False  # set by the worker once its affinity is applied
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._started = threading.Event()
        self._error: BaseException | None = None  # the setup's, raised here
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()
        # the worker's torch.set_num_threads also set the process's default, which threads started later take
        # (the load's packing pool): the caller's count is the default again, the worker keeps its own
        torch.set_num_threads(saved)
        if self._error is not None:
            raise RuntimeError(f"the host lane worker could not start: {self._error}") from self._error
        _LIVE.add(self)

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the worker; its result or exception comes back through the future."""
        if not self._thread.is_alive():
            raise RuntimeError("the host lane worker is closed")
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # the constructor raises it (a submit would otherwise wait forever)
            self._error = e
            return
        finally:  # the constructor waits for this, even if the setup failed (the thread then ends)
            self._started.set()
        with torch.no_grad():
            while (item := self._jobs.get()) is not None:
                fut, fn, args = item
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # handed to the waiting thread, which raises it
                    fut.set_exception(e)

    def _setup(self) -> None:
        name_os_thread(self._thread.name)  # before torch starts its OpenMP threads, which inherit the name
        if self.pick.cpus and hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(threading.get_native_id(), self.pick.cpus)
                self.pinned = True
            except OSError as e:
                log.warning("host lane worker: could not pin to CPUs %s (%s); running unpinned",
                            cpu_ranges(self.pick.cpus), e)
        torch.set_num_threads(self.pick.threads)
        torch.get_num_threads()  # torch's first query in a thread applies the process default (which the
        # constructor then sets back to its caller's): made here, it keeps this count for the worker

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread.is_alive()

    def drain(self) -> None:
        """Wait until every call submitted so far has finished (a Ctrl-C meanwhile is raised after: one decode
        step's host work is bounded, and a call left running would write the host KV cache, and the buffers
        handed back, under the next step's feet)."""
        if not self._thread.is_alive():
            return
        fut: Future = Future()
        self._jobs.put((fut, lambda: None, ()))
        with ctrl_c_after():
            fut.exception()  # the queue runs in order: every earlier call has ended

    def close(self) -> None:
        """Finish the queued calls and stop the thread (idempotent; a Ctrl-C meanwhile is raised after the join: a
        process that exits with the worker inside torch aborts)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            with ctrl_c_after():
                self._thread.join()
        _LIVE.discard(self)


_LIVE: weakref.WeakSet[HostWorker] = weakref.WeakSet()  # workers not closed yet


@atexit.register
def _close_live() -> None:
    """At interpreter exit (an error, or an engine never closed), stop any worker still running: a daemon thread
    left inside torch when the interpreter finalizes aborts the process ("terminate called without an active
    exception")."""
    for worker in list(_LIVE):
        try:
            worker.close()
        except BaseException:  # noqa: BLE001 -- exiting anyway
            pass


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (15 bytes at most) where the OS shows it (``top -H``, ``ps -L``,
    /proc/<pid>/task/<tid>/comm), on Linux; elsewhere, or where /proc is not writable, nothing."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_bytes(name.encode()[:15])
    except OSError:
        pass


def run_pinned(pick: CorePick, fn: Callable, *args):
    """``fn(*args)`` on a short-lived worker set up per ``pick`` (e.g. to measure the host's GEMV rate
    with the threads and cores the host lane will have); its result, or its exception raised here."""
    worker = HostWorker(pick, name="host-lane-probe")
    try:
        return worker.submit(fn, *args).result()
    finally:
        worker.close()
