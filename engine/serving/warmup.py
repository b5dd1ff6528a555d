"""Warm-up before a server says it is ready: run the shapes its steps meet, so no request pays for them.

The Triton kernels compile each specialisation on its first launch and tune each new shape bucket on
its first call (kernels/tuning.py); a server that skips this makes its first requests wait for both
(measured on the H200, 7B at 6 GiB: TTFT p50 14.65 s for one client, where the prefill takes ~0.3 s).
So after loading, the engine thread runs scheduler-shaped steps of synthetic sequences through the
:class:`~engine.serving.runner.ModelRunner` (the serving code path: slot or paged KV, grouped steps,
sampling):

* real passes where tuning happens (a shape's first call outside ``ops.prompt_chunk``'s untuned
  range of <= 64 rows): prompt slices at every GEMM row bucket up to the prefill chunk (packed into
  few passes), and mixed steps whose picked rows hit each lm_head GEMV bucket (the head runs outside
  that range). Every other group of a step has <= 64 rows and runs untuned: eager decode steps and
  the decode group of mixed steps need compiles only. With the slot cache on CUDA, pure decode
  replays the decode graph, whose capture already ran its shapes (tuned) at load.
* dry, compile-only passes (``engine.ahead.dry``: no weight is streamed, Triton launches compile in a
  thread pool) where only compiles are missing: prompt slices at each bucket's even and odd sizes and
  a long prompt's later slice (after a chunk of cached positions),
  and the decode group of mixed steps at every row count and at contexts that give each attention
  split bound (eager pure decode runs the same layer shapes; it gets a pass per row count for its head). Only where compile-ahead is wanted (CUDA, Triton kernels).

The warm-up leaves nothing behind: KV storage is zeroed, block tables and the prefix cache are
empty (a fresh allocator), the runner's counters and samplers are reset; the scheduler's counters
(what /metrics reports) are never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine import ahead, prompt_graphs
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from engine.serving.warmup_plan import WarmStep, piece_steps, plan_warmup, varlen_steps
from engine.varlen import enabled as varlen_enabled
from kernels.qlinear import DENSE_MIN_M

log = logging.getLogger(__name__)

DRY_LIMIT_S = 60.0  # compile-only passes stop after this long (they are ordered: prompt slices first)
_SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05)  # compiles the sampling kernels


@dataclass
class WarmupReport:
    """What the warm-up ran: the steps (in order), those skipped (KV blocks short), and the seconds."""

    steps: list[WarmStep] = field(default_factory=list)
    skipped: list[WarmStep] = field(default_factory=list)
    cut: int = 0  # compile-only steps left out at the time limit
    real_s: float = 0.0
    dry_s: float = 0.0
    graphs_s: float = 0.0  # capturing the prompt graphs (engine.prompt_graphs), when wanted

    @property
    def seconds(self) -> float:
        return self.real_s + self.dry_s + self.graphs_s

    def summary(self) -> str:
        real = sum(not s.dry for s in self.steps)
        return (f"warm-up: {real} real passes in {self.real_s:.1f} s, {len(self.steps) - real} compile-only "
                f"passes in {self.dry_s:.1f} s" + (f", {len(self.skipped)} skipped" if self.skipped else "")
                + (f", {self.cut} left out at the time limit" if self.cut else "")
                + (f", prompt graphs captured in {self.graphs_s:.1f} s" if self.graphs_s else ""))


def warm_up(scheduler: Scheduler, dry_limit_s: float = DRY_LIMIT_S) -> WarmupReport:
    """Run :func:`plan_warmup`'s steps for this scheduler's engine and clean up after them (see the
    module docstring); compile-only steps stop after ``dry_limit_s`` (the rest are counted as ``cut``).
    Returns what ran. Call it before the first request is added."""
    assert not scheduler.has_work(), "warm up before serving"
    runner = scheduler.runner
    # the decode group runs eagerly here, not by the decode graphs (engine.graph_unit): a served pass the unit
    # cannot take (a chunk of prompt tokens, lent or parked rows) runs it so, and its attention splits must be
    # built by then (session 53's H100: with the unit on in the warm-up, the first such pass built two kernels);
    # the unit itself only replays graphs captured at load
    unit, runner.graph_unit = runner.graph_unit, False
    try:
        return _warm(scheduler, dry_limit_s)
    finally:
        runner.graph_unit = unit


def _warm(scheduler: Scheduler, dry_limit_s: float) -> WarmupReport:
    eng = scheduler.engine
    paged = scheduler.blocks is not None
    steps = plan_warmup(eng.opts.batch, eng.opts.prefill_chunk, eng.opts.max_context,
                        eager_decode=paged or eng.graph is None, dry=ahead.wanted(eng.model),
                        block_size=scheduler.blocks.block_size if paged else None,
                        splits=(DENSE_MIN_M - 1,) if eng.quant is not None else ())
    report = WarmupReport()
    # each planned slice its own group, its own projections: the slices hit the GEMM row buckets to tune one by
    # one (packed or stacked, a real pass's groups meet those buckets and the same kernel specialisations;
    # stacked in the warm-up, the slices' row counts would add up and leave those buckets untuned)
    with scheduler.runner.groups_apart():
        try:
            _run_planned(scheduler, steps, report, dry_limit_s)
        finally:
            _clean(scheduler)
    if not paged and ahead.wanted(eng.model) and eng.model.ops.varlen and varlen_enabled():
        try:  # stacked, as served: the one-launch kernels' specialisations
            _run_dry(scheduler, varlen_steps(eng.opts.batch, eng.opts.prefill_chunk, eng.opts.max_context),
                     report, dry_limit_s)
        finally:
            _clean(scheduler)
    _run_pieces(scheduler, report, dry_limit_s)
    if not paged and prompt_graphs.wanted() and eng.device.type == "cuda" and eng.model.ops.varlen \
            and varlen_enabled() and scheduler.runner.stack_rows:  # the shapes are tuned by now
        t0 = time.perf_counter()
        # a unit holds at most two slices of each sequence (one slice's tail, the next one's head)
        eng.model.prompt_graphs = prompt_graphs.try_capture(eng.model, eng.cache, scheduler.runner.stack_rows,
                                                            2 * eng.opts.batch)
        report.graphs_s = time.perf_counter() - t0
        _clean(scheduler)
    log.info("%s", report.summary())
    return report


def _run_pieces(scheduler: Scheduler, report: WarmupReport, dry_limit_s: float) -> None:
    """Where a served pass may run as one long unit (``ModelRunner.one_unit``; streamed passes stack their prompts,
    others feed one chunk a pass): :func:`piece_steps`, each pass whole (the learned cost would cut it)."""
    eng, runner = scheduler.engine, scheduler.runner
    stacked = piece_steps(eng.opts.batch, eng.opts.prefill_chunk, eng.opts.max_context, runner.one_unit) \
        if runner.cost is not None else []
    if not stacked:
        return
    saved = runner.cost.budget
    runner.cost.budget = lambda floor, cap: cap
    try:  # as served: the MLP in pieces (engine/mlp_chunks.py) tunes those GEMMs
        t0 = time.perf_counter()
        for step in (s for s in stacked if not s.dry):
            _run(scheduler, step, report)
        report.real_s += time.perf_counter() - t0
        if ahead.wanted(eng.model):  # compile-only passes where compiles run ahead (CUDA, Triton kernels)
            _run_dry(scheduler, [s for s in stacked if s.dry], report, dry_limit_s)
    finally:
        runner.cost.budget = saved
        _clean(scheduler)


def _run_planned(scheduler: Scheduler, steps: list[WarmStep], report: WarmupReport, dry_limit_s: float) -> None:
    """The real steps, then the compile-only ones until ``dry_limit_s`` (the rest counted as ``cut``)."""
    t0 = time.perf_counter()
    for step in (s for s in steps if not s.dry):
        _run(scheduler, step, report)
    report.real_s = time.perf_counter() - t0
    _run_dry(scheduler, [s for s in steps if s.dry], report, dry_limit_s)


def _run_dry(scheduler: Scheduler, dry: list[WarmStep], report: WarmupReport, dry_limit_s: float) -> None:
    """Compile-only steps until ``dry_limit_s`` (the rest counted as ``cut``), their seconds added up."""
    if not dry:
        return
    t0 = time.perf_counter()
    with ahead.dry(scheduler.engine.model):
        for i, step in enumerate(dry):
            if time.perf_counter() - t0 > dry_limit_s:
                report.cut += len(dry) - i
                break
            _run(scheduler, step, report)
    report.dry_s += time.perf_counter() - t0


def _sequences(scheduler: Scheduler, step: WarmStep) -> list[Sequence]:
    """The step's sequences in their slots, ``num_computed`` set so that each feeds what the step says."""
    eng = scheduler.engine
    vocab = eng.cfg.vocab_size
    decode_slots = list(range(step.decode_rows - step.decoding, step.decode_rows))
    free = [s for s in range(eng.opts.batch) if s not in decode_slots]
    seqs = []
    for i, (slot, n, computed) in enumerate([(s, step.context, step.context - 1) for s in decode_slots]
                                            + [(s, step.cached + n, step.cached) for s, n in zip(free, step.slices)]):
        params = _SAMPLED if computed == 0 and step.decode_rows and not step.dry else SamplingParams()
        # a token of its own: no two share a KV block (the content does not matter to kernels or tuning)
        s = Sequence([i % vocab] * n, params, eng.tokenizer, request_id="warm-up")
        s.slot, s.num_computed = slot, computed
        seqs.append(s)
    assert len(seqs) == step.decoding + len(step.slices), "more sequences than slots"
    return seqs


def _run(scheduler: Scheduler, step: WarmStep, report: WarmupReport) -> None:
    seqs = _sequences(scheduler, step)
    blocks = scheduler.blocks
    try:
        if blocks is not None:
            for s in seqs:
                if not blocks.can_admit(s.prompt_ids, s.length + 1):
                    report.skipped.append(step)
                    return
                blocks.admit(s.seq_id, s.prompt_ids, s.length + 1)
        scheduler.runner.step(seqs)
        report.steps.append(step)
    finally:
        if blocks is not None:
            scheduler.runner.paged[0].finish()
            blocks.clear()  # no table, no cached prefix: the next step admits from a fresh allocator


def _clean(scheduler: Scheduler) -> None:
    """Zero the KV storage, forget blocks, samplers and counters the warm-up touched."""
    runner, eng = scheduler.runner, scheduler.engine
    runner.reset()
    if runner.paged is not None:
        cache, blocks = runner.paged
        cache.finish()
        cache.k.zero_()
        cache.v.zero_()
        cache.direct_steps = 0
        blocks.clear()
    else:
        eng.cache.k.zero_()
        eng.cache.v.zero_()
        eng.cache.reset()
