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

from engine import ahead
from engine.serving.params import SamplingParams
from engine.serving.scheduler import Scheduler
from engine.serving.sequence import Sequence
from engine.varlen import enabled as varlen_enabled
from kernels.qlinear import DENSE_MIN_M

log = logging.getLogger(__name__)

GEMV_MAX_M = 64  # kernels.linear.GEMV_MAX_M: more rows go to the tuned GEMM, keyed by next_power_of_2(rows)
REAL_CONTEXT = 16  # decoding rows' context in real passes (their tuning does not depend on it)
DRY_LIMIT_S = 60.0  # compile-only passes stop after this long (they are ordered: prompt slices first)
_SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05)  # compiles the sampling kernels


@dataclass(frozen=True)
class WarmStep:
    """One warm-up step: ``decoding`` sequences decode in the top slots of rows ``0 .. decode_rows``
    (the decode group's rows), each with ``context`` tokens after the step; each entry of ``slices``
    is a prompt of that many tokens prefilled whole in a free slot (after ``cached`` tokens already in the
    cache: a long prompt's later slice). ``dry``: a compile-only pass."""

    dry: bool
    decode_rows: int
    decoding: int
    context: int
    slices: tuple[int, ...] = ()
    cached: int = 0  # each slice's prompt has this many tokens in the cache before it (a later slice)

    @property
    def kind(self) -> str:
        return "decode" if not self.slices else "mixed" if self.decode_rows else "prefill"


@dataclass
class WarmupReport:
    """What the warm-up ran: the steps (in order), those skipped (KV blocks short), and the seconds."""

    steps: list[WarmStep] = field(default_factory=list)
    skipped: list[WarmStep] = field(default_factory=list)
    cut: int = 0  # compile-only steps left out at the time limit
    real_s: float = 0.0
    dry_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.real_s + self.dry_s

    def summary(self) -> str:
        real = sum(not s.dry for s in self.steps)
        return (f"warm-up: {real} real passes in {self.real_s:.1f} s, {len(self.steps) - real} compile-only "
                f"passes in {self.dry_s:.1f} s" + (f", {len(self.skipped)} skipped" if self.skipped else "")
                + (f", {self.cut} left out at the time limit" if self.cut else ""))


def _pow2(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` up to next_power_of_2(hi)."""
    out, b = [], lo
    while b // 2 < hi:
        out.append(b)
        b *= 2
    return out


def _even_odd(eff: int) -> set[int]:
    """Each row bucket's even and odd sizes up to ``eff`` (a power of two b and b - 1: Triton compiles a row count
    that is a multiple of 16 apart from one that is not)."""
    return {n for b in _pow2(4, eff) for n in (b - 1, b)}


def _pack(sizes: list[int], cap: int, most: int) -> list[tuple[int, ...]]:
    """First-fit decreasing: groups of at most ``most`` sizes summing to at most ``cap``."""
    bins: list[list[int]] = []
    for n in sorted(sizes, reverse=True):
        fit = next((b for b in bins if sum(b) + n <= cap and len(b) < most), None)
        if fit is None:
            bins.append([n])
        else:
            fit.append(n)
    return [tuple(b) for b in bins]


def _contexts(max_context: int, block_size: int | None) -> list[int]:
    """Decode contexts whose attention kernels differ, up to the longest a decoding sequence reaches
    (max_context - 1). Slot cache: one per split bound (powers of two from 256). Paged: the split cap is
    the block table's width, so widths of a power of two blocks, and from 16 blocks on (where the split
    count's divisibility by 16 specialises the kernel) one block fewer too."""
    last = max(1, max_context - 1)
    if block_size is None:
        return [c for c in _pow2(256, last) if c < last] + [last]
    widths = {w for b in _pow2(1, -(-last // block_size)) for w in ((b, b - 1) if b >= 16 else (b,))}
    return sorted({min(w * block_size, last) for w in widths})


def plan_warmup(batch: int, chunk: int, max_context: int, eager_decode: bool, dry: bool,
                block_size: int | None = None, splits: tuple[int, ...] = ()) -> list[WarmStep]:
    """The warm-up steps for ``batch`` slots and a ``chunk``-token prefill chunk: real passes first, then
    (``dry``) compile-only ones. ``eager_decode``: pure decode steps run eagerly (paged KV, no decode
    graph) and get compile-only passes too; ``block_size``: paged KV's (None: the slot cache), which
    decides the decode contexts whose kernels differ (:func:`_contexts`). ``splits``: row counts where the
    linears change kernel inside a GEMM bucket; each gets a real slice too (a quantized model's fused
    qgemm takes rows up to ``DENSE_MIN_M - 1``, inside the dense GEMM's 256-row bucket: without its own
    slice its 129..255-row bucket tuned in the first live pass that met it: 10 builds, 11.2 s, on the H200)."""
    eff = max(1, min(chunk, max_context))
    ctx = max(1, min(REAL_CONTEXT, max_context - 1))
    # the first pack is the chunk alone: its one picked row also tunes the lm_head GEMV's single-row bucket
    real = sorted({min(b, eff) for b in _pow2(2 * GEMV_MAX_M, eff)} | {n for n in splits if 2 * GEMV_MAX_M < n < eff},
                  reverse=True)
    packs = _pack(real, eff, batch) or ([(eff,)] if eff >= 2 else [])
    steps = [WarmStep(False, 0, 0, 0, p) for p in packs]
    for m in (16, 32, 64):  # lm_head rows of a mixed step = decoding rows + slices: each GEMV bucket once
        p = min(m, batch)
        if p >= (2 if m == 16 else m // 2 + 1) and eff - (p - 1) >= 2:
            steps.append(WarmStep(False, p - 1, p - 1, ctx, (min(eff - (p - 1), 2 * GEMV_MAX_M),)))
    if not dry:
        return steps
    sizes = _even_odd(eff) | {2, eff}
    steps += [WarmStep(True, 0, 0, 0, p) for p in _pack([n for n in sizes if 2 <= n <= eff], eff, batch)]
    # a prompt longer than the chunk: a later slice after a chunk of cached positions, even and odd (the
    # H200's first 1857-token request after a warm-up without them compiled two GEMM specialisations)
    steps += [WarmStep(True, 0, 0, 0, (n,), cached=eff) for n in sorted({eff // 2, eff // 2 + 1, eff - 1})
              if n >= 2 and eff + n < max_context]
    contexts = _contexts(max_context, block_size)
    for c in contexts:
        for r in range(1, batch + 1):
            decoding = r if r < batch else r - 1  # a slot is left for the slice
            if batch >= 2 and decoding >= 1 and eff - decoding >= 2:
                steps.append(WarmStep(True, r, decoding, c, (2,)))
    if eager_decode:  # its layers run the mixed steps' decode group: only its head's rows are new
        steps += [WarmStep(True, r, r, contexts[0]) for r in range(1, batch + 1)]
    return steps


def varlen_steps(batch: int, chunk: int, max_context: int) -> list[WarmStep]:
    """Compile-only steps of two prompt slices sharing a stack, for engine/varlen.py's one-launch kernels
    (on unless ``LAYERSTREAM_VARLEN_PREFILL=0``): the longer slice (the attention's row count) at each bucket's
    even and odd sizes, and one stack of a multiple of 16 rows (the RoPE + append's), so a served burst builds
    none."""
    eff = max(1, min(chunk, max_context))
    if batch < 2:
        return []
    steps = [WarmStep(True, 0, 0, 0, (n, 2)) for n in sorted(_even_odd(eff) | {2}) if n + 2 <= eff]
    return steps + ([WarmStep(True, 0, 0, 0, (16, 16))] if eff >= 32 else [])


def warm_up(scheduler: Scheduler, dry_limit_s: float = DRY_LIMIT_S) -> WarmupReport:
    """Run :func:`plan_warmup`'s steps for this scheduler's engine and clean up after them (see the
    module docstring); compile-only steps stop after ``dry_limit_s`` (the rest are counted as ``cut``).
    Returns what ran. Call it before the first request is added."""
    assert not scheduler.has_work(), "warm up before serving"
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
    runner = scheduler.runner  # streamed passes stack their prompts (one chunk a pass otherwise)
    stacked = piece_steps(eng.opts.batch, eng.opts.prefill_chunk, eng.opts.max_context, runner.one_unit) \
        if runner.cost is not None else []
    if stacked:
        saved = runner.cost.budget  # the whole stack in one pass (the learned cost would cut it)
        runner.cost.budget = lambda floor, cap: cap
        try:  # a pass as one long unit, as served: its MLP in pieces (engine/mlp_chunks.py) tunes those GEMMs
            t0 = time.perf_counter()
            for step in (s for s in stacked if not s.dry):
                _run(scheduler, step, report)
            report.real_s += time.perf_counter() - t0
            if ahead.wanted(eng.model):  # compile-only passes where compiles run ahead (CUDA, Triton kernels)
                _run_dry(scheduler, [s for s in stacked if s.dry], report, dry_limit_s)
        finally:
            runner.cost.budget = saved
            _clean(scheduler)
    log.info("%s", report.summary())
    return report


def piece_steps(batch: int, chunk: int, max_context: int, rows: int) -> list[WarmStep]:
    """Where a served pass of at most ``rows`` prompt rows runs as one unit (``ModelRunner.one_unit``): a real
    pass of that many rows in chunk-sized slices (its MLP in pieces, whose GEMM shapes are one set a model,
    ``engine.mlp_chunks.MOST_PIECES``, and whose rows fall in the GEMMs' top row bucket: tuned), then a compile-only
    one of an odd row count (the kernels' other specialisation of the rows)."""
    eff = max(1, min(chunk, max_context - 1))
    steps = []
    for total, dry in ((rows, False), (rows - 1, True)):
        if total <= eff or batch < 2:
            return []
        slices = [eff] * min(batch, total // eff)
        rest = total - sum(slices)
        if len(slices) < batch and rest >= 2:
            slices.append(rest)
        if sum(slices) > eff:
            steps.append(WarmStep(dry, 0, 0, 0, tuple(slices)))
    return steps


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
