"""The engine on one background thread; other threads submit and cancel sequences through a queue.

The thread loads the model and runs the warm-up (``ready`` is set once it can serve; ``phase`` says
"loading", "warming up" or "ready"), then alternates between taking
commands from its inbox and running scheduler steps. A sequence's sink is called on this thread
after each step that changed it. At most ``max_batch + max_waiting`` sequences are outstanding
(running, waiting or in the inbox); ``submit`` raises :class:`QueueFull` beyond that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch

from engine.engine import Engine
from engine.serving.passprof import PassProfiler
from engine.serving.scheduler import QueueFull, Scheduler, StepStats
from engine.serving.sequence import Sequence, SeqOutput

log = logging.getLogger(__name__)


ADMIT_POLL_S = 0.001  # how often a closing gather window looks whether the requests being admitted arrived


def gather_window(engine: Engine) -> float:
    """The idle engine's gather window: a tenth of the plan's predicted decode step, at most 25 ms (a
    streamed pass at 6 GiB: ~20-25 ms against 190-260 ms passes; all resident: a fraction of a ms)."""
    plan = getattr(engine, "plan", None)
    step = getattr(plan, "predicted_step_s", None) or 0.0
    return min(0.025, 0.1 * step)


class NotReady(RuntimeError):
    """The model is still loading (or failed to load)."""


class DeviceLost(RuntimeError):
    """The CUDA context is gone (a device-side assert, an illegal address): no later step can run."""


def device_lost(e: BaseException) -> bool:
    """Whether ``e`` is an error after which this process cannot use its GPU again."""
    text = str(e)
    return (isinstance(e, getattr(torch, "AcceleratorError", ())) or "device-side assert" in text
            or "illegal memory access" in text)


class EngineLoop:
    """Owns an engine (built by ``load`` on its own thread) and a :class:`Scheduler` over it."""

    def __init__(self, load: Callable[[], Engine], max_waiting: int = 64,
                 on_step: Callable[[StepStats], None] | None = None,
                 warmup: Callable[[Scheduler], object] | None = None, gather_s: float | None = None,
                 **scheduler_options) -> None:
        """``warmup(scheduler)`` runs after loading, before ``ready`` (engine.serving.warmup.warm_up; its
        result is kept as ``warmup_report``; a failure is logged and serving goes on without it).
        ``gather_s``: when requests arrive at an idle engine, how long the first pass waits for more (the
        window restarts at each arrival, at most 4 windows in all), so requests sent together share one
        pass instead of the later ones waiting a whole pass for the next; default :func:`gather_window`
        of the plan. ``scheduler_options`` go to :class:`Scheduler` (kv_cache, block_size, num_blocks)."""
        self.gather_s = gather_s
        self._load = load
        self._warmup = warmup
        self.warmup_report: object | None = None
        self.phase = "loading"
        self._scheduler_options = scheduler_options
        self.on_step = on_step
        self.max_waiting = max_waiting
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0
        self._admitting = 0  # requests between their handler's start and their submit (see admitting)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="layerstream-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def outstanding(self) -> int:
        """Sequences submitted and not finished yet."""
        return self._outstanding

    @property
    def capacity(self) -> int:
        assert self.engine is not None
        return self.engine.opts.batch + self.max_waiting

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Around a request's checks, tokenization and :meth:`submit`: while any request is in there, an idle
        engine's first pass waits for it (to the gather window's cap), so a burst whose later requests are still
        being tokenized when the first is submitted shares that pass (session 44, a fresh H100: 16 requests sent
        within 22 ms, the first ran alone for 172 ms and the other 15 waited; TTFT p50 657 ms)."""
        release = self.hold_admission()
        try:
            yield
        finally:
            release()

    def hold_admission(self) -> Callable[[], None]:
        """As :meth:`admitting`, from now until the returned release is called (again: nothing). The server's
        middleware holds one from a completion request's first byte, while its body is read and parsed."""
        with self._lock:
            self._admitting += 1
        held = [True]

        def release() -> None:
            with self._lock:
                if held[0]:
                    held[0] = False
                    self._admitting -= 1
        return release

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none): NotReady while loading, ValueError for a request that cannot run,
        QueueFull when the outstanding limit would be passed."""
        if not self.ready.is_set() or self.scheduler is None or self._stopped.is_set():
            raise NotReady(f"the model is {self.phase}" if self.error is None and not self._stopped.is_set()
                           else "the engine is not running")
        for s in seqs:
            self.scheduler.check(s.prompt_ids, s.params)  # reads the engine's shape only: safe here
        if len(seqs) > self.capacity:
            raise ValueError(f"{len(seqs)} completions at once can never fit: this server holds "
                             f"{self.capacity} (--max-batch + --max-waiting); lower n or send fewer prompts a request")
        with self._lock:
            if self._outstanding + len(seqs) > self.capacity:
                raise QueueFull(f"{self._outstanding} requests in flight (limit {self.capacity}); retry later")
            self._outstanding += len(seqs)
        for s in seqs:
            s.sink = self._counting(s.sink)
        self._inbox.put(("add", seqs))

    def abort(self, seq_ids: list[int]) -> None:
        """Cancel sequences; each frees its slot at the next step boundary."""
        self._inbox.put(("abort", list(seq_ids)))

    def abort_all(self) -> None:
        """Cancel every sequence (running, waiting, queued) at the next step boundary."""
        self._inbox.put(("abort_all", None))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left and end the thread (the model stays loaded until ``close``)."""
        self._stopped.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self.stop()
        if self.engine is not None:
            self.engine.close()

    def _counting(self, sink: Callable[[SeqOutput], None] | None) -> Callable[[SeqOutput], None]:
        def wrapped(out: SeqOutput) -> None:
            if out.finished:
                with self._lock:
                    self._outstanding -= 1
            if sink is not None:
                try:
                    sink(out)
                except RuntimeError as e:  # the receiver is gone (its event loop closed at shutdown): not ours
                    log.debug("output of sequence %s not delivered: %s", out.seq.seq_id, e)
        return wrapped

    def _run(self) -> None:
        try:
            self.engine = self._load()
            hold = os.environ.get("LAYERSTREAM_HOLD_OUTPUTS", "1") != "0"  # 0: each step's outputs at its end
            self.scheduler = Scheduler(self.engine, self.max_waiting, self.on_step, hold_outputs=hold,
                                       **self._scheduler_options)
            self._warm_up()
            self.scheduler.profiler = PassProfiler.from_env()  # served passes only, not the warm-up's
        except BaseException as e:  # reported by /health and NotReady; the process decides what to do
            log.error("loading the model failed: %s", e)
            self.error = e
            return
        finally:
            self.phase = "ready" if self.error is None else "failed"
            self.ready.set()
        try:
            self._serve()
        except BaseException as e:  # the thread is dying: no request may wait for it forever
            log.exception("the engine thread failed")
            self.error = e
        finally:
            self._stopped.set()
            self._abort_all()

    def _warm_up(self) -> None:
        if self._warmup is None or self._stopped.is_set():
            return
        self.phase = "warming up"
        try:
            self.warmup_report = self._warmup(self.scheduler)
        except Exception as e:  # an optimisation: serving goes on (first requests then compile and tune)
            if device_lost(e):
                raise DeviceLost(f"the GPU failed during the warm-up ({e}); restart the server") from e
            log.exception("the warm-up failed; serving without it")

    def _serve(self) -> None:
        sched = self.scheduler
        if self.gather_s is None:
            self.gather_s = gather_window(self.engine)
        while True:
            idle = not sched.has_work()
            if not self._drain(block=idle) or idle and sched.has_work() and not self._gather():
                return
            if sched.has_work():
                try:
                    sched.step()
                except Exception as e:  # one bad step must not kill the server: fail the running requests
                    if device_lost(e):  # but nothing runs on a lost CUDA context: the thread ends, and the server
                        raise DeviceLost(f"the GPU failed ({e}); restart the server") from e
                    log.exception("engine step failed; aborting %d running sequences", len(sched.running))
                    self._abort_all(running_only=True)

    def _gather(self) -> bool:
        """Requests just woke an idle engine: take what else arrives within the gather window (restarted
        by each arrival, and held open while a request is being admitted: :meth:`admitting`; 4 windows at
        most) into the same first pass; False once told to stop. (A window shortened to a burst's pace after its
        second arrival, twice the last gap, split bursts whose sends were spread: bench/results/2026-12-06-cpu-s49.)"""
        now = time.monotonic()
        last, end = now, now + 4 * self.gather_s
        while True:
            now = time.monotonic()
            left = min(last + self.gather_s, end) - now
            if left <= 0:
                if not self._admitting or now >= end:
                    return True
                left = min(ADMIT_POLL_S, end - now)  # a request is on its way in: look again shortly
            try:
                cmd, arg = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if not self._apply(cmd, arg):
                return False
            last = time.monotonic()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands; False once told to stop."""
        try:
            cmd, arg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if not self._apply(cmd, arg):
                return False
            try:
                cmd, arg = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: str, arg) -> bool:
        """One queued command; False for "stop"."""
        if cmd == "stop":
            return False
        if cmd == "add":
            for s in arg:
                try:
                    self.scheduler.add(s)
                except (ValueError, QueueFull) as e:  # checked at submit: not expected, never left hanging
                    log.error("could not queue %s: %s", s.request_id, e)
                    if s.sink:
                        s.sink(s.abort())
        elif cmd == "abort":
            for seq_id in arg:
                self.scheduler.abort(seq_id)
        elif cmd == "abort_all":
            self._abort_all()
        return True

    def _abort_all(self, running_only: bool = False) -> None:
        sched = self.scheduler
        for s in list(sched.running) + ([] if running_only else list(sched.waiting)):
            sched.abort(s.seq_id)
        if not running_only:  # sequences still in the inbox never reached the scheduler
            while True:
                try:
                    cmd, arg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if cmd == "stop":  # keep it for the loop
                    self._inbox.put((cmd, arg))
                    break
                for s in arg if cmd == "add" else []:
                    if s.sink:
                        s.sink(s.abort())
