"""One forward pass for every active sequence: prompt chunks next to single decode tokens.

Sequence ``s`` lives in KV-cache row ``s.slot`` (slot cache) or in the blocks of its table (paged).
A decode step feeds every row its one pending token ([rows, 1]; rows of free slots below the highest
busy one ride along with no real token). A step with prompts to prefill runs groups in one pass over
the layers: the decoding rows as one [rows, 1] group, then each prompt's slices of at most the engine's
prefill chunk (the activation workspace the memory plan sized); with a paged cache the prompts' last
slices share [rows, longest] groups within that chunk (``ModelRunner._slices``), else each slice is a
group of its own. Decode tokens are never padded to a prompt's length. Consecutive prompt groups run each
layer's projections as one stack of token rows, at most one chunk (``Model.layer_stacked``, their states one
unit; ``LAYERSTREAM_STACK_PROMPTS=0``: group by group), the attention group by group.

How many prompt tokens one pass takes depends on what the pass costs. All resident, a pass is compute:
one prefill chunk of prompt tokens a pass keeps the decoding rows' inter-token time short. With layers
streaming, every pass pays for one stream of the non-resident weights: a pass takes about two streams'
time of prompt tokens at their measured cost (``passcost``), at most what the plan's prompt-state memory
holds (``batch x (max_context - 1)``). Passes of one 2048-token chunk left 16 clients' prompts waiting
~9 passes (TTFT p50 2.7 s on the H200 at 6 GiB); all in one pass, every first token waited 1.0 s.
Prompts take a pass's room fewest tokens left first (``passcost.prompt_order``). A streamed pass
takes at least the shorter half of the waiting prompts (and the median one), and a prompt passed over
(or cut short) goes whole in the next pass: a burst of arrivals gets its first tokens from two passes
at most, the shorter half's from the first.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from engine.engine import Engine
from engine.footprint import state_bytes_per_token
from engine.graph_unit import GraphUnit
from engine.mlp_chunks import one_unit_rows
from engine.groups import Group
from engine.serving.blocks import BlockManager
from engine.serving.paged_cache import BindSpec, PagedKVCache, PagedOps
from engine.serving.packing import pack_rows, stack_free, stack_slices
from engine.serving.pass_groups import decode_group, id_grid, slice_group
from engine.serving.passcost import MAX_DEFERRED, PassCost, prompt_order
from engine.serving.retry import grouped_retried, padded_retried
from engine.serving.rows import RowSampler
from engine.serving.sequence import Logprob, Sequence
from engine.switches import switch_on
from engine.upload import upload, upload_list


class ModelRunner:
    """Runs steps on an :class:`Engine`: KV in the engine's cache (row = slot), or paged (``paged``)."""

    def __init__(self, engine: Engine, paged: tuple[PagedKVCache, BlockManager] | None = None) -> None:
        self.engine = engine
        self.paged = paged
        # decode steps read the blocks in place: Triton kernels and a block size the kernel takes
        self.direct = bool(paged) and engine.ops.name == "triton" and paged[0].can_read_directly()
        if self.direct:
            engine.model.ops = PagedOps(engine.model.ops)
        self.vocab = engine.cfg.vocab_size
        self.rows = RowSampler(engine)  # each sequence's token from its logits row
        self.steps = 0
        self.last_tokens = 0  # real tokens fed by the last step
        self.on_queued: Callable[[], None] | None = None  # called once a step's pass is queued, before its wait
        self.pack_slices = True  # paged: prompts' last slices share groups (off during the warm-up: groups_apart)
        opts, plan = engine.opts, engine.plan
        streams = plan is not None and plan.num_slots > 0
        self.pass_tokens = max(opts.prefill_chunk, opts.batch * (opts.max_context - 1)) if streams \
            else opts.prefill_chunk  # tokens one pass feeds at most (see the module docstring)
        self.cost = PassCost() if streams else None  # streamed passes: their size from their measured cost
        # prompt groups share each layer's projections up to one chunk of token rows (the workspace the plan
        # sized): fewer launches, and a packed weight widened once for all of them
        # (LAYERSTREAM_STACK_PROMPTS=packed: engine.stacking's packing, the decode group stacked too: off, served
        # it was slower than the default in every pair of sessions 28 and 29; 0: none)
        # A stack holds one chunk; with LAYERSTREAM_STACK_PIECES=1 a pass whose prompt rows fit what the MLP in
        # pieces allows runs them as one unit (engine/mlp_chunks.py: measured slower, its pieces' launches giving
        # back what fewer units save; bench/results/2026-12-06-h100-s46/call5)
        stack = os.environ.get("LAYERSTREAM_STACK_PROMPTS", "order")
        self.stack_rows = opts.prefill_chunk if stack != "0" else 0
        self.one_unit = one_unit_rows(engine) if stack != "0" else 0  # a pass of at most this many prompt rows: one
        if stack != "0" and os.environ.get("LAYERSTREAM_STACK_ROWS"):  # an A/B: units of more (or fewer) rows
            self.stack_rows = int(os.environ["LAYERSTREAM_STACK_ROWS"])
        self.pass_stack = self.stack_rows  # this pass's: one unit where its prompt rows fit (_slices)
        self.stack_packed = stack == "packed"
        self.fill_stacks = os.environ.get("LAYERSTREAM_FILL_STACKS", "1") != "0"  # 0: slices of a chunk (an A/B)
        # a pass with prompts runs its decoding rows by the decode step's graphs (engine.graph_unit), not eagerly
        # (LAYERSTREAM_GRAPH_UNIT=0: eagerly): session 53's H100 had such passes at 85 ms against 97 ms in process
        # and the served 16-client TTFT p50 at 214 ms against 246 ms (bench/results/2026-12-07-h100-s53/call1/)
        self.graph_unit = switch_on("LAYERSTREAM_GRAPH_UNIT")
        self.graph_unit_passes = 0  # passes whose decoding rows ran so

    @contextlib.contextmanager
    def groups_apart(self):
        """Within: every prompt slice its own group and its own projections (no packed slices, no stacking), so
        that each meets its own GEMM row bucket (the warm-up's tuning)."""
        saved = self.pack_slices, self.stack_rows, self.one_unit
        self.pack_slices, self.stack_rows, self.one_unit = False, 0, 0
        try:
            yield
        finally:
            self.pack_slices, self.stack_rows, self.one_unit = saved

    def reset(self) -> None:
        """Forget the step counters and the shared samplers (after a warm-up's synthetic steps)."""
        self.steps = self.last_tokens = 0
        self.rows.samplers.clear()
        if self.cost is not None:
            self.cost.reset()

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int | None, Logprob | None]]:
        """Feed every sequence its next chunk; (sequence, sampled token, its logprob entry when asked for)
        for those fed to the end; the token is None where the logits came out non-finite."""
        assert seqs and all(s.slot is not None and s.pending > 0 for s in seqs)
        t0, decoding = time.perf_counter(), sum(s.pending == 1 for s in seqs)
        if any(s.pending > 1 for s in seqs):
            logits, q_lens = grouped_retried(self, seqs)  # prompt slices next to decode tokens, no padding between
        else:
            logits, q_lens = padded_retried(self, seqs)
        if self.on_queued is not None:
            self.on_queued()
        for s in seqs:
            s.num_computed += q_lens[s.slot]
        if self.paged:
            cache, blocks = self.paged
            cache.finish()
            for s in seqs:
                blocks.computed(s.seq_id, s.all_ids, s.num_computed)
        self.steps += 1
        self.last_tokens = sum(q_lens)
        ready = [s for s in seqs if s.pending == 0]
        if not ready:
            return []
        bad = self.nonfinite(logits, ready)  # the host waits for the pass here: its time is known
        tokens = self.sample(logits, ready)
        if self.cost is not None:
            self.cost.observe(self.last_tokens - decoding, time.perf_counter() - t0)
        return [(s, None, None) if s.seq_id in bad else (s, tok, self.logprob(logits, s, tok))
                for s, tok in zip(ready, tokens)]

    def nonfinite(self, logits: torch.Tensor, seqs: list[Sequence]) -> set[int]:
        """Ids of the sequences whose logits row (by slot) holds a NaN or an inf: their token means nothing."""
        ok = torch.isfinite(logits[:, : self.vocab]).all(-1).tolist()  # a flag a row: no index tensor to upload
        return {s.seq_id for s in seqs if not ok[s.slot]}

    def _padded(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """One [rows, t] batch, every row right-padded to t (the decode steps)."""
        eng = self.engine
        rows = max(s.slot for s in seqs) + 1
        cap = eng.opts.max_context
        # never pad past the context end: the torch kv_append clamps such positions onto the last one
        t = min(max(s.pending for s in seqs), max(1, eng.opts.prefill_chunk // rows),
                min(cap - s.num_computed for s in seqs))
        start, q_lens = [0] * rows, [0] * rows
        for s in seqs:
            start[s.slot], q_lens[s.slot] = s.num_computed, min(s.pending, t)
        ids = id_grid(rows, t, ((s.slot, s.all_ids[s.num_computed: s.num_computed + q_lens[s.slot]]) for s in seqs))
        max_len = max(a + n for a, n in zip(start, q_lens))
        if self.paged:
            cache, blocks = self.paged
            tables: list[list[int]] = [[] for _ in range(rows)]
            for s in seqs:
                tables[s.slot] = blocks.reserve(s.seq_id, s.num_computed + q_lens[s.slot])
            cache.bind(tables, start, q_lens, t, direct=t == 1 and self.direct)
        return self._forward(ids, start, q_lens, max_len), q_lens

    def _grouped(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[int]]:
        """A step with prompts to prefill: the decoding sequences as one [rows, 1] group, then the
        prompts' slices (``_slices``), all in one pass over the layers (``Model.forward_groups``), up to
        ``pass_tokens`` tokens; a prompt that finds no room waits for the next step. Returns (logits
        [rows, V] by slot, tokens fed per slot)."""
        eng = self.engine
        rows = max(s.slot for s in seqs) + 1
        decode = [s for s in seqs if s.pending == 1]
        q_lens, groups, specs, pick, owners = [0] * rows, [], [], [], []
        if decode:
            group, spec = self._decode_group(seqs, decode)
            groups.append(group)
            specs.append(spec)
            for s in decode:
                q_lens[s.slot] = 1
                pick.append((0, s.slot, 0))
                owners.append(s)
        room = self.pass_tokens - len(decode)
        if self.cost is not None:
            room = min(room, self.cost.room([s.pending for s in seqs if s.pending > 1], eng.opts.prefill_chunk,
                                            self.pass_tokens))
        parts = self._slices(seqs, max(1, room), q_lens)
        for part in parts:
            group, spec = self._slice_group(part)
            groups.append(group)
            specs.append(spec)
            for r, (s, a, n) in enumerate(part):
                if a + n == s.num_computed + q_lens[s.slot]:  # the sequence's last slice this step
                    pick.append((len(groups) - 1, r, n - 1))
                    owners.append(s)
        cache = eng.cache
        if self.paged:  # every group reads and writes its own rows' blocks
            cache = self.paged[0]
            cache.bind_groups(specs)
            groups = [replace(g, kv=partial(cache.group_layer, k)) for k, g in enumerate(groups)]
        # park: host states wait in the unreached positions of the slot rows this pass names, or in a paged
        # cache's never-used blocks (this pass's blocks are reserved by now), when they fit (engine.state_parking)
        host = self._host_states(groups)
        park = (cache.unused_spans(self.paged[1].alloc.free) if host else False) if self.paged else True
        free = stack_free(parts, len(groups) - len(parts)) if self.stack_packed else None
        # a slot cache's rows no running sequence holds and no group runs (a decode group pads across free rows):
        # the lm_head's chunks may wait there for the pass (engine.head_ahead)
        named = {r for g in groups for r in range(g.row0, g.row0 + g.ids.shape[0])}
        spare = None if self.paged else sorted(set(range(cache.batch)) - {s.slot for s in seqs} - named)
        unit = self._graph_unit(seqs, decode, groups, host, free)
        out = eng.model.forward_groups(groups, cache, pick, eng.ops.prompt_chunk, host_states=host, park=park,
                                       stack_rows=self.pass_stack, stack_free=free,
                                       spare_rows=None if unit else spare, decode_graph=unit)
        logits = torch.zeros((rows, out.shape[1]), dtype=out.dtype, device=out.device)
        logits[torch.tensor([s.slot for s in owners], device=out.device)] = out
        return logits, q_lens

    def _slices(self, seqs: list[Sequence], room: int, q_lens: list[int]) -> list[list[tuple[Sequence, int, int]]]:
        """The prompts' slices of this step, as groups of (sequence, start, tokens) rows, in run order: a
        prompt's slices of at most ``--prefill-chunk`` tokens, in order, each but the last a group of its own, then
        the last slices: on a slot cache each a group, every slice cut where the stacks it fills are full
        (``packing.stack_slices``); on a paged one packed into groups whose rows x longest slice stay within the
        chunk (the activation workspace the plan sized), so short prompts share a group's launches (a
        streamed pass with many prompts is host-bound: each group costs ~1 ms of launches a layer on an
        H200's host). Sets ``q_lens[slot]`` to each fed sequence's token count."""
        eng, chunk = self.engine, self.engine.opts.prefill_chunk
        singles, lasts = [], []
        force = self.cost is not None  # streamed: a prompt passed over or cut short goes whole in the next pass
        for s in sorted((s for s in seqs if s.pending > 1), key=partial(prompt_order, 1 if force else MAX_DEFERRED)):
            fed = min(s.pending, max(room, s.pending) if force and s.deferred else room,
                      eng.opts.max_context - s.num_computed)
            if fed < 1:
                s.deferred += 1
                continue
            s.deferred = int(force and fed < s.pending)
            room = max(0, room - fed)
            q_lens[s.slot] = fed
            starts = list(range(s.num_computed, s.num_computed + fed, chunk))
            singles += [[(s, a, chunk)] for a in starts[:-1]]
            lasts.append((s, starts[-1], s.num_computed + fed - starts[-1]))
        fed = sum(n for g in singles for _, _, n in g) + sum(n for _, _, n in lasts)
        self.pass_stack = self.one_unit if self.stack_rows and fed <= self.one_unit else self.stack_rows
        if not self.paged or not self.pack_slices:  # slot cache: a group's rows are consecutive rows; the slices
            # cut where the stacks they fill are full
            slices = [x for g in singles for x in g] + lasts
            return [[x] for x in stack_slices(slices, chunk, self.pass_stack * self.fill_stacks)]
        return singles + [[lasts[i] for i in part] for part in pack_rows([n for _, _, n in lasts], chunk)]

    def _slice_group(self, part: list[tuple[Sequence, int, int]]) -> tuple[Group, BindSpec | None]:
        """One group of prompt slices (``pass_groups.slice_group``)."""
        return slice_group(part, self.paged, self.engine.device)

    def _graph_unit(self, seqs: list[Sequence], decode: list[Sequence], groups: list[Group], host: bool,
                    free: set[int] | None) -> GraphUnit | None:
        """The pass's decoding rows through the decode step's graphs (``engine.graph_unit``), where a slot cache has
        them and the pass neither keeps prompt states in host memory (parked in rows' tails) nor is long enough to
        lend free rows to the lm_head (``engine.head_ahead``): the graphs write a padding key in every row."""
        eng = self.engine
        graph = eng.graph if self.paged is None else None
        if (not self.graph_unit or graph is None or not decode or host or free is not None
                or eng.model.host is not None or sum(g.ids.numel() for g in groups) >= eng.opts.prefill_chunk):
            return None
        tok, start = [0] * graph.batch, [0] * graph.batch
        for s in seqs:  # a row that is not decoding: its padding key where its sequence writes next
            start[s.slot] = s.num_computed
        for s in decode:
            tok[s.slot] = s.all_ids[s.num_computed]
        self.graph_unit_passes += 1
        return GraphUnit(graph, tok, start, groups[0].ids.shape[0])

    def _host_states(self, groups: list[Group]) -> bool:
        """Whether this pass's groups wait between layers in host memory: when the plan puts prompt states
        there and they would not fit the VRAM it keeps for states beside the computed chunk (a pass of a
        few short prompts stays on the GPU, its states never crossing PCIe)."""
        eng = self.engine
        if not eng.model.host_states or len(groups) < 2:
            return False
        per_token = state_bytes_per_token(eng.cfg, eng.dtype.itemsize)  # the plan's figure
        return sum(g.ids.numel() for g in groups) * per_token > eng.plan.prefill_state_bytes

    def _decode_group(self, seqs: list[Sequence], decode: list[Sequence]) -> tuple[Group, BindSpec | None]:
        """The decoding rows' group (``pass_groups.decode_group``)."""
        return decode_group(seqs, decode, self.paged, self.direct, self.engine.device)

    def _forward(self, ids: torch.Tensor, start: list[int], q_lens: list[int], max_len: int) -> torch.Tensor:
        eng, dev = self.engine, self.engine.device
        rows, t = ids.shape
        graph = eng.graph if self.paged is None else None
        if t == 1 and graph is not None and rows <= graph.batch:  # a pure decode step: replay the graph
            pad = graph.batch - rows
            tok = torch.cat([ids[:, 0], torch.zeros(pad, dtype=torch.long)])  # on the host: the graph stages them
            return graph(tok, torch.tensor(start + [0] * pad, dtype=torch.int32))[:rows]
        start_t, q_t = upload_list(start, torch.int32, dev), upload_list(q_lens, torch.int32, dev)
        with eng.ops.prompt_chunk(rows * t):
            cache = self.paged[0] if self.paged else eng.cache
            return eng.model.forward(upload(ids, dev), start_t, q_t, cache, max_len=max_len)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Next token of each sequence from its row (by slot) of ``logits`` (``engine.serving.rows``)."""
        return self.rows.sample(logits, seqs)

    def logprob(self, logits: torch.Tensor, s: Sequence, token: int) -> Logprob | None:
        """The token's log-probability entry, when the sequence asks for one (``engine.serving.rows``)."""
        return self.rows.logprob(logits, s, token)
