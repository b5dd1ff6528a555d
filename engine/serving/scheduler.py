"""Continuous batching: sequences join and leave the running batch at step boundaries.

Each batch row is a slot. A waiting sequence is admitted when a slot is free (lowest first, so the
batch stays dense); every step then feeds all running sequences in one forward pass (see ``runner``):
new prompts are prefilled in chunks next to the sequences that decode. A sequence that finishes, or
is aborted, frees its slot for the next step. Waiting is bounded: ``add`` raises :class:`QueueFull`
beyond ``max_waiting``, so a server can answer 503 instead of queueing forever.

With ``kv_cache="slots"`` a slot is also a row of the engine's KV cache. With ``"paged"`` the KV
lives in blocks (see ``blocks`` and ``paged_cache``): prompts reuse cached prefix blocks, and a
sequence is admitted only when its worst case fits beside the running ones' (no preemption).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.engine import Engine
from engine.generate import nonfinite_message
from engine.serving.blocks import BlockManager
from engine.serving.paged_cache import PagedKVCache
from engine.serving.params import FieldError, SamplingParams
from engine.serving.passprof import PassProfiler
from engine.serving.runner import ModelRunner
from engine.serving.sequence import Sequence, SeqOutput, Status

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is full: try again later."""


@dataclass
class StepStats:
    """Running totals and the last step's shape (read by the metrics endpoint)."""

    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    last_step_s: float = 0.0
    last_cpu_s: float = 0.0  # the stepping thread's CPU time in it: well below last_step_s, it was blocked (GIL)
    last_batch: int = 0
    last_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens found in cached KV blocks (not computed again)
    last_waiting: int = 0  # sequences left waiting for a slot after the last step's admission
    graph_replays: int = 0  # prompt units' layers run by captured graphs so far (engine/prompt_graphs.py)
    lent_copies: int = 0  # streamed lm_head chunks copied ahead into lent buffers so far (engine/head_ahead.py)
    dense_widened: int = 0  # packed weights widened once for a layer's units so far (engine/dense_layer.py)
    last_arrivals: tuple[float, float] | None = None  # the first and last arrival (monotonic) of those it admitted
    last_received: tuple[float, float] | None = None  # when the first and last of their requests reached the app


class Scheduler:
    """Admits, steps and retires sequences over ``engine.opts.batch`` slots."""

    def __init__(self, engine: Engine, max_waiting: int = 256,
                 on_step: Callable[[StepStats], None] | None = None, kv_cache: str = "slots",
                 block_size: int = 16, num_blocks: int | None = None, hold_outputs: bool = False) -> None:
        """``kv_cache="paged"`` replaces the engine's contiguous cache (and the decode graph that reads it)
        by ``num_blocks`` blocks (default ``batch * max_context / block_size``: the memory the plan sized).

        ``hold_outputs`` (the server's): a step's unfinished outputs reach their sinks once the next step's pass
        has been queued on the device, while the host waits for it, instead of between the two steps. Between
        steps the host is on the critical path (a streamed pass's first layers wait for it), and a server's
        sinks wake the event loop, whose work on the streamed chunks then competes with it for the GIL. Nothing is
        held on a CPU, where a pass runs as it is queued, nor when layers stream from disk, where queueing a
        pass waits for the reads."""
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        if kv_cache not in ("slots", "paged") or block_size < 1:
            raise ValueError(f"kv_cache must be 'slots' or 'paged' (got {kv_cache!r}) and block_size >= 1")
        self.engine = engine
        self.blocks: BlockManager | None = None
        paged = None
        if kv_cache == "paged":
            opts = engine.opts
            num = num_blocks or max(1, opts.batch * opts.max_context // block_size)
            if num * block_size < opts.max_context:
                raise ValueError(f"{num} KV blocks of {block_size} tokens cannot hold one {opts.max_context}-token "
                                 "context; give more blocks or lower --max-context")
            engine.cache = engine.graph = None  # free their memory before taking it again as blocks
            paged = (PagedKVCache(engine.cfg, num, block_size, engine.dtype, engine.device),
                     BlockManager(num, block_size))
            self.blocks = paged[1]
        self.runner = ModelRunner(engine, paged)
        self.max_waiting = max_waiting
        self.free_slots = list(range(engine.opts.batch))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = StepStats()
        self.on_step = on_step  # called after every step (metrics)
        self.hold_outputs = hold_outputs and engine.device.type == "cuda" and engine.weights.stream.disk is None
        self._held: list[SeqOutput] = []  # outputs waiting for the next step's pass to be queued
        self.profiler: PassProfiler | None = None  # the server sets it after its warm-up (engine.serving.passprof)
        self.runner.on_queued = self.deliver_held

    @property
    def max_context(self) -> int:
        return self.engine.opts.max_context

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError (with the token counts) when this request can never run on this engine."""
        if not prompt_ids:
            raise ValueError("empty prompt: give at least one token")
        vocab = self.engine.cfg.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token id out of range [0, {vocab})")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            if bad := [t for t in ids if t >= vocab]:
                raise FieldError(name, f"{name} names token {bad[0]}, past this model's vocabulary [0, {vocab})")
        need = len(prompt_ids) + (params.max_tokens or 1)
        if need > self.max_context:
            raise ValueError(f"this model's context holds {self.max_context} tokens, but {len(prompt_ids)} prompt "
                             f"tokens + {params.max_tokens or 1} max_tokens = {need}; shorten the prompt or "
                             "lower max_tokens")

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (checked); it joins the batch at a coming step."""
        self.check(seq.prompt_ids, seq.params)
        if len(self.waiting) >= self.max_waiting + len(self.free_slots):
            raise QueueFull(f"{len(self.waiting)} requests are already waiting; retry later")
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> bool:
        """Finish a waiting or running sequence now (its sink gets an ``abort`` output); False if unknown."""
        self.deliver_held()  # a sequence's tokens reach its sink before its end
        for s in list(self.waiting) + self.running:
            if s.seq_id == seq_id:
                if s in self.waiting:
                    self.waiting.remove(s)
                out = s.abort()
                self._retire(s)
                if s.sink:
                    s.sink(out)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[SeqOutput]:
        """Admit what fits, run one pass over all running sequences, retire the finished ones."""
        before = len(self.running)
        self._admit()
        new = self.running[before:]
        self.stats.last_arrivals = (min(s.arrival for s in new), max(s.arrival for s in new)) if new else None
        self.stats.last_received = (min(s.received for s in new), max(s.received for s in new)) if new else None
        if not self.running or any(s.pending > 1 for s in self.running):
            self.deliver_held()  # a prompt's pass may wait for the device midway: the outputs go first
        if not self.running:
            return []
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.profiler is not None and self.profiler.wants(sum(s.pending for s in self.running if s.pending > 1)):
            results = self.profiler.run(self.stats.steps + 1, lambda: self.runner.step(self.running),
                                        lambda: self.runner.last_tokens)
        else:
            results = self.runner.step(self.running)  # delivers the held outputs once its pass is queued
        outs = []
        for s, tok, logprob in results:
            out = (self._fail_nonfinite(s) if tok is None
                   else s.append(tok, self.engine.tokenizer.eos_ids, self.max_context, logprob))
            outs.append(out)
            if out.finished:
                self._retire(s)
        st = self.stats
        st.steps += 1
        st.generated_tokens += sum(len(o.token_ids) for o in outs)
        st.last_step_s, st.last_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        st.last_batch = len(self.running) + sum(o.finished for o in outs)
        st.last_tokens, st.last_waiting = self.runner.last_tokens, len(self.waiting)
        graphs = self.engine.model.prompt_graphs
        st.graph_replays = graphs.replays if graphs is not None else st.graph_replays
        st.lent_copies, st.dense_widened = self.engine.weights.stream.lent.copies, self.engine.ops.dense_widened
        if self.on_step:
            self.on_step(st)
        for out in outs:
            if not out.seq.sink:
                continue
            if self.hold_outputs and self.running and not out.finished:
                self._held.append(out)
            else:
                out.seq.sink(out)
        return outs

    def deliver_held(self) -> None:
        """Give the held outputs (``hold_outputs``) to their sinks, in order."""
        held, self._held = self._held, []
        for out in held:
            out.seq.sink(out)

    def _fail_nonfinite(self, s: Sequence) -> SeqOutput:
        message = nonfinite_message(self.engine.dtype, len(s.output_ids))
        log.error("request %s: %s; failing it", s.request_id, message)
        return s.fail(message)

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            s = self.waiting[0]
            worst = min(len(s.prompt_ids) + (s.params.max_tokens or self.max_context), self.max_context)
            if self.blocks is not None and not self.blocks.can_admit(s.prompt_ids, worst):
                break  # first come, first served: wait for blocks to be freed
            self.waiting.popleft()
            s.slot = heapq.heappop(self.free_slots)
            s.status = Status.RUNNING
            s.num_computed = self.blocks.admit(s.seq_id, s.prompt_ids, worst) if self.blocks is not None else 0
            self.running.append(s)
            self.stats.prompt_tokens += len(s.prompt_ids)
            self.stats.cached_prompt_tokens += s.num_computed

    def _retire(self, s: Sequence) -> None:
        if self.blocks is not None:
            self.blocks.free(s.seq_id)
        if s in self.running:
            self.running.remove(s)
        if s.slot is not None:
            heapq.heappush(self.free_slots, s.slot)
            s.slot = None
