"""The host lane's guard: a run whose host layers make decode steps slower than streaming them stops using them.

``--host-compute auto`` plans host layers from measured rates (``memory.host_lane``), and a run keeps the rate its
lane achieved for the next plan (``memory.host_rate.record_achieved``). A first plan can still be wrong where the
lane, beside the streamer's copies, reads far slower than the rates measured before it: on an H100 machine's host
the bf16 7B's host layers took 27.8 ms each where the plan expected 11.4, and the step took 290 ms against 188 ms
streaming every layer (bench/results/2026-12-05-h100-s38/call4/). And a host's memory bandwidth moves for seconds at
a time (session 39: a 1 GiB GEMV at 78 GB/s, then 105 for a few seconds, then 78 again;
bench/results/2026-12-05-h100-s39/call6/), so a lane that wins at first may lose later.

So a generation watches its decode steps: after ``WARM`` steps, in each run of ``WINDOW`` steps that follows, a
median above ``MARGIN`` times the plan's step without host layers (``memory.plan.HostLane.stream_step_s``, which the
planner predicts within a few percent) makes it re-plan the lane (``shrink_host_lane``): the lane's own layers
chosen again at the rate it achieved over that window (:func:`memory.host_lane.replan`; not its average since it
began, which a host that slows down after a good start outlives). Where fewer host layers still
beat streaming, the others go back to the copy engine and a new guard watches the smaller lane; where none does,
or the re-plan keeps them all (the step model and the steps disagree), the lane is retired for the rest of the run.
Layers given back have their keys and values copied into the device cache, and the decode graph, which holds host
steps, is captured again without them (no warm-up step, so the cache keeps the generation's keys; eager steps if
that fails). Eager steps cost more than the lane lost: on an H100 host the first retired run decoded at 2.17 tok/s
against 4.84 streaming from the start (the first eager step tunes for seconds: 4.5 s in bench/guard_probe.py, then
~1.2x the graph's step); captured again, 4.56 against 4.73 under the same memory-bandwidth hog
(bench/results/2026-12-05-h100-s40/). Only ``auto`` lanes are watched (``--host-compute N`` is the user's own
choice), and only in :func:`engine.generate.generate` (the benchmarks time the lane as planned); not where the
plan's step without host layers cannot stand for the steps (layers read from disk, eager steps on a GPU).
"""

from __future__ import annotations

import logging
import statistics

from engine.graphs import try_capture
from engine.host_forms import form_name
from engine.interrupts import ctrl_c_after
from memory.host_lane import replan, without_lane
from memory.host_rate import record_achieved

log = logging.getLogger(__name__)

WARM = 3  # decode steps not counted (the first ones may still compile or fault pages in)
WINDOW = 6  # steps timed after them before deciding
MARGIN = 1.10  # slower than streaming by more than this: the lane goes


class LaneGuard:
    """Times a generation's decode steps against the plan's step without host layers, a window of them at a time;
    says once when to retire. Given the lane (``host``), it also counts the lane's own steps and seconds over each
    window, so that the judged window's rate (:meth:`window`) is what a re-plan uses, not the lane's average since
    it began (earlier generations, the decode graph's warm-up steps), which a host that slows down outlives."""

    def __init__(self, stream_step_s: float, host=None) -> None:
        assert stream_step_s > 0, stream_step_s
        self.limit, self.times, self.done, self.measured = stream_step_s * MARGIN, [], False, 0.0
        self.seen = 0  # steps observed
        self.windows = 0  # windows judged
        self.host, self._mark = host, None  # the lane's (steps, seconds) when the current window began
        self.judged: tuple[int, float] | None = None  # the lane's steps and seconds in the last window judged

    def _counts(self) -> tuple[int, float] | None:
        return None if self.host is None else (self.host.steps, self.host.seconds)

    def observe(self, step_s: float) -> bool:
        """Record one decode step's seconds; True (once) when a window's median says the lane should be retired."""
        self.seen += 1
        if self.done or self.seen <= WARM:
            self._mark = self._counts()  # the window begins after the last warm-up step
            return False
        self.times.append(step_s)
        if len(self.times) < WINDOW:
            return False
        self.measured, self.times, self.windows = statistics.median(self.times), [], self.windows + 1
        now = self._counts()
        self.judged = None if now is None or self._mark is None else (now[0] - self._mark[0], now[1] - self._mark[1])
        self._mark = now
        self.done = self.measured > self.limit
        return self.done

    def window(self) -> tuple[int, float] | None:
        """The lane's (steps, seconds) over the window that fired (None: not counted)."""
        return self.judged


def guard_for(engine) -> LaneGuard | None:
    """A guard for ``engine``'s host lane when it has one planned by ``auto`` (else None). Not where the plan's
    step without host layers cannot stand for the steps: a plan that reads layers from disk (its step model counts
    them at the H2D rate and no disk read, so disk-bound steps would lose every window and the re-plan, seeing a
    lane at its planned rate, would retire a lane that wins), or eager steps on a GPU (no decode graph: each step
    pays launches the plan leaves out)."""
    lane, plan = engine.plan.host_lane, engine.plan
    if engine.model.host is None or lane is None or lane.mode != "auto" or not lane.stream_step_s > 0:
        return None
    if plan.disk_layers or (engine.device.type == "cuda" and engine.graph is None):
        log.info("the host lane is not watched: %s", "layers are read from disk" if plan.disk_layers
                 else "decode steps run eagerly (no CUDA graph)")
        return None
    return LaneGuard(lane.stream_step_s, engine.model.host)


def shrink_host_lane(engine, measured_s: float, window: tuple[int, float] | None = None) -> LaneGuard | None:
    """The guard fired: keep the host layers that still win at the rate the lane achieved (a guard for that smaller
    lane is returned) or retire the lane (None). ``measured_s``: the median decode step that decided it; ``window``:
    the lane's (steps, seconds) over that window (:meth:`LaneGuard.window`), whose rate the re-plan uses and the
    next plan keeps (None: the lane's since its timing began). A Ctrl-C meanwhile is raised once the lane, the plan,
    the caches and the graph agree again (one landing inside the graph's capture had left later runs eager)."""
    with ctrl_c_after():
        return _shrink(engine, measured_s, window)


def _shrink(engine, measured_s: float, window: tuple[int, float] | None) -> LaneGuard | None:
    host, lane = engine.model.host, engine.plan.host_lane
    gbps = achieved_gbps(engine, plan_bytes=True, window=window)
    narrower = replan(engine.plan, gbps) if gbps else None
    if narrower is None or len(narrower.host_layers) >= len(host.layers):
        retire_host_lane(engine, measured_s, window)
        return None
    keep_host_rate(engine, window=window)  # before the lane's timing starts afresh
    back = [i for i in host.layers if i not in narrower.host_layers]
    _to_device_cache(engine, back)
    host.drop(back)
    engine.plan = engine.weights.plan = narrower
    _recapture(engine)
    log.warning("host lane shrunk: decode steps took %.1f ms with %d host layers against %.1f ms predicted streaming "
                "them; at the %.1f GB/s the lane achieved, %d of them (%s) are predicted to win (%.1f ms a step), the "
                "others stream from now on", measured_s * 1e3, len(lane.layers), lane.stream_step_s * 1e3, gbps,
                len(narrower.host_layers), ", ".join(map(str, narrower.host_layers)),
                narrower.host_lane.step_s * 1e3)
    return guard_for(engine)


def _to_device_cache(engine, layers) -> None:
    """Copy host ``layers``' keys and values (fp32 on the host) into the device cache (its dtype)."""
    host, cache = engine.model.host, engine.cache
    for i in layers:
        for dst, src in zip(cache.layer(i), host.kv[i]):
            dst.copy_(src)


def _recapture(engine) -> None:
    """A decode graph that holds host steps is captured again for the lane as it now is (no warm-up step: the cache
    keeps the generation's keys); eager steps if that fails."""
    if engine.graph is not None and any(kind == "host" for kind, _ in engine.graph.steps):
        batch, engine.graph = engine.graph.batch, None
        engine.graph = try_capture(engine.model, engine.cache, batch, warm=False)


def retire_host_lane(engine, measured_s: float, window: tuple[int, float] | None = None) -> None:
    """Stop computing ``engine``'s host layers on the CPU: keep the rate the lane achieved, copy the host KV cache
    of each host layer into the device cache, close the worker, stream those layers from now on (the plan says so:
    :func:`memory.host_lane.without_lane`) and capture the decode graph again without host steps. ``measured_s``:
    the median decode step that decided it (for the log); ``window``: as for :func:`shrink_host_lane`."""
    host = engine.model.host
    if host is None:
        return
    keep_host_rate(engine, window=window)  # the next plan on this machine knows the lane's real rate
    _to_device_cache(engine, host.layers)
    host.close()
    engine.model.host, lane = None, engine.plan.host_lane
    engine.plan = engine.weights.plan = without_lane(engine.plan)  # the plan says so: every layer streams
    engine.weights.host_decode(False)
    _recapture(engine)
    log.warning("host lane retired: decode steps took %.1f ms with %d host layers, against %.1f ms predicted "
                "streaming them (the plan expected %.1f ms with them); streaming every layer for the rest of this "
                "run, and the next plan on this machine uses the rate the lane achieved", measured_s * 1e3,
                len(lane.layers), lane.stream_step_s * 1e3, lane.step_s * 1e3)


def achieved_gbps(engine, min_steps: int = 4, plan_bytes: bool = False,
                  window: tuple[int, float] | None = None) -> float | None:
    """The GB/s ``engine``'s host lane achieved since its timing began, or over ``window`` (its steps and seconds)
    where that holds ``min_steps`` (None with fewer decode steps): in the bytes its worker reads (widened layers:
    widened), or with ``plan_bytes`` in the plan's layer bytes."""
    host = engine.model.host
    if host is None:
        return None
    steps, seconds = _counts(host, min_steps, window)
    if steps < min_steps or seconds <= 0:
        return None
    inputs = engine.plan.host_lane.inputs if plan_bytes else None
    per_step = (sum(inputs.layer_bytes[i] for i in host.layers) if inputs is not None
                else len(host.layers) * host.layer_bytes)
    return per_step * steps / seconds / 1e9


def _counts(host, min_steps: int, window: tuple[int, float] | None) -> tuple[int, float]:
    """The lane's (steps, seconds) a rate is taken over: ``window`` where it holds ``min_steps``, else the lane's."""
    return window if window is not None and window[0] >= min_steps else (host.steps, host.seconds)


def keep_host_rate(engine, min_steps: int = 4, window: tuple[int, float] | None = None) -> None:
    """After decode steps with a host lane: the GB/s it achieved (over ``window`` where given, as for
    :func:`achieved_gbps`), kept for the next plan on this machine (``memory.host_rate.record_achieved``)."""
    host, gbps = engine.model.host, achieved_gbps(engine, min_steps, window=window)
    if gbps is None:
        return
    steps = _counts(host, min_steps, window)[0]
    try:
        record_achieved(engine.opts.batch, engine.dtype, host.worker.pick.threads, gbps,
                        form_name(host.weight_form, engine.quant, engine.dtype))
        log.info("host lane achieved %.1f GB/s over %d steps (kept for the next plan)", gbps, steps)
    except OSError as e:  # a read-only cache directory costs the next plan its accuracy, nothing more
        log.warning("could not keep the host lane's rate (%.1f GB/s): %s", gbps, e)
