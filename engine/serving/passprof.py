"""``LAYERSTREAM_PROFILE_PASSES=DIR[:N]``: a server's first N passes after its warm-up that feed prompts (at least
``MIN_TOKENS`` waiting; N default 4) run under cProfile on the thread that steps the scheduler, each written to
``DIR/pass_<step>.txt``: its prompt tokens, wall and thread CPU time, then the functions by own time and by
cumulative time.

Why: a served prompt pass and the same pass run in process (bench/burst_probe.py) took different times on an
H200 (session 28: 422-427 ms served against 265-436 ms in process, with kernels/fastlaunch.py and packed stacking
on), and a step's line in ``--step-log`` cannot say where a pass's time went. The profile tells the host's own
work from its waits: a pass bound by the device spends its end in the synchronising call that reads the logits
(``tolist``, CUDA's default sync spins, so it counts as CPU time too); one bound by the host spends it in the
launch path. Write errors are logged, never raised: a profile must not fail a request.
"""

from __future__ import annotations

import cProfile
import io
import logging
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
TOP = 45  # functions listed in each order
MIN_TOKENS = 256  # prompt tokens waiting for a pass to be one worth profiling


class PassProfiler:
    """Profiles the first ``limit`` prompt passes into ``directory`` (see the module docstring)."""

    def __init__(self, directory: Path, limit: int = 4) -> None:
        self.directory, self.limit, self.done = directory, limit, 0

    @classmethod
    def from_env(cls) -> PassProfiler | None:
        """The profiler ``LAYERSTREAM_PROFILE_PASSES`` asks for, or None (unset or empty)."""
        spec = os.environ.get("LAYERSTREAM_PROFILE_PASSES", "")
        if not spec:
            return None
        where, sep, count = spec.rpartition(":")
        if not (sep and where and count.isdigit()):
            where, count = spec, "4"
        return cls(Path(where), int(count))

    def wants(self, prompt_tokens: int) -> bool:
        """Whether the next pass, with this many prompt tokens waiting, is profiled: one of the first ``limit``
        with at least ``MIN_TOKENS`` (a load test's one-request warm-up, a few tokens, is not the pass to see)."""
        return prompt_tokens >= MIN_TOKENS and self.done < self.limit

    def run(self, step: int, fn: Callable[[], T], tokens: Callable[[], int]) -> T:
        """``fn()`` under cProfile; its report (``tokens()`` read after it) as ``pass_<step>.txt``."""
        prof = cProfile.Profile()
        t0, c0 = time.perf_counter(), time.thread_time()
        result = prof.runcall(fn)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        self.done += 1
        out = io.StringIO()
        out.write(f"pass at step {step}: {tokens()} tokens, {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms thread CPU "
                  "(under cProfile)\n")
        for order in ("tottime", "cumulative"):
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(TOP)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / f"pass_{step}.txt").write_text(out.getvalue(), encoding="utf-8")
        except OSError as e:
            log.warning("LAYERSTREAM_PROFILE_PASSES: cannot write %s (%s)", self.directory, e)
        return result
