"""CUDA graphs of a stacked unit's prompt layer at bucketed row counts (a served streamed pass's units).

A streamed pass over many prompts is bound by the host issuing launches: each unit of stacked prompt rows costs
every layer ~20 launches (the norms, each projection's dequantization into the dense tile and its GEMM, RoPE +
append, the one-launch attention, the SwiGLU), and on the H100 the 16-prompt burst's first pass took as long as
its engine thread's CPU time (bench/results/2026-12-06-h100-s46/call4/). Where every row of a unit is a prompt
slice on the slot cache (``engine.varlen``: one RoPE + append and one attention launch for all of them), its
layer is the same computation at every pass given the unit's rows, its layout (positions, cache rows and
positions, spans) and the layer's weights and keys. So :class:`PromptGraphs` captures, for each row bucket
``b`` (the stack's rows, then powers of two down to ``MIN_ROWS``), one graph per layer and weight address
(a resident layer's, or each staging slot a streamed layer may arrive in, as the decode graphs do) that reads a
unit's states and layout from static buffers and writes its output states back there. A unit of R <= b rows
is copied in (states, and its layout once a pass when no other unit of that bucket came between), replayed,
and copied out: 3-4 launches for the ~20. Rows R .. b are padding: no span holds them and their cache
positions are -1, so they write no key and no row reads them (every op is per row, the attention per span).

Captured at the end of a server's warm-up (the shapes tuned by then), on CUDA with the Triton kernels and a slot
cache; used only for passes over that cache. The attention of a captured layout runs through a block table (a
program per real row block and head): over the padded grid, 34 sequences x 16 row blocks x 28 heads, the attention
took 37.8 ms of the H100's traced burst pass, where its real work (~1.2 TFLOP) needs a few: the rest, the empty
programs (an estimate).

Opt-in (``LAYERSTREAM_PROMPT_GRAPHS=1``): measured slower. With the block table, served at 6 GiB on an H100
(session 55, bench/results/2026-12-07-h100-s55/call1/), three cold 16-client bursts a server: TTFT p50 238-248 ms
with the graphs against 213-232 ms eagerly, first passes 216-226 ms against 191-211 ms. Before it (session 47,
bench/results/2026-12-06-h100-s47/), at 7 GiB,
alternated in one process, the burst's first pass took 253-297 ms with graphs against 248-401 ms eagerly: the
graphs held their time where the host slowed (the eager arm's 373-401 ms), not below the eager arm's best; that
was before the block table (traced then: the compute stream busy 217 of 251 ms, the host 11 ms). And their memory
pool comes on top of the eager workspace: at the 7B's 6 GiB a pass whose prompt units fall back to eager ones of a
chunk (the graphs switched off: the eager arm of call2) runs out of memory and is retried in half-chunk units; a
server's layouts hold two slices of every sequence (a unit holds no more), and with the block table padded
sequences cost the attention nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from engine.graphs import _KEY, slot_address
from engine.upload import upload_list
from engine.varlen import VarlenPlan, plan_unit
from kernels.attention_prefill import varlen_block_m
from kernels.graph_capture import capture

log = logging.getLogger(__name__)

MIN_BLOCK = 16  # the fewest rows an attention program takes (a layout buffer's room for its block table)
MIN_ROWS = 128  # the smallest bucket: shorter units run eagerly (their launches are as many, but rare)
# Buckets of at least PIECES_FROM rows run their MLP in PIECES pieces (engine/mlp_chunks.py): the graphs' memory pool
# comes on top of the eager passes' workspace, and whole, a 2,048-row MLP did not fit beside it under the 7B's 6 GiB
# budget (H100, session 47); in a graph the pieces' extra launches cost the host nothing (the variable: an A/B;
# LAYERSTREAM_MLP_PIECES=J sets their count)
PIECES_FROM = int(os.environ.get("LAYERSTREAM_GRAPH_PIECES_FROM", "1024"))
PIECES = 3  # that count: fewer pieces, fewer fp32 sums of down_proj's output (the 7B's widened gate_up rows fill
# the plan's dense tile in 3 anyway)


def wanted() -> bool:
    """Whether a server captures prompt graphs (``LAYERSTREAM_PROMPT_GRAPHS=1``)."""
    return os.environ.get("LAYERSTREAM_PROMPT_GRAPHS", "0").strip().lower() in ("1", "on", "true", "yes")


def buckets(stack_rows: int) -> list[int]:
    """The row buckets, largest first: the stack's rows, then the powers of two below it down to MIN_ROWS."""
    out, b = [stack_rows], 1 << (stack_rows - 1).bit_length() - 1
    while b >= MIN_ROWS:
        if b < stack_rows:
            out.append(b)
        b //= 2
    return out


@dataclass
class Layout:
    """A unit's varlen layout packed for bucket ``b`` (int32 [3b + 5S + NB]): per row its RoPE position, cache
    position (-1: padding) and cache row; per sequence (S slots, zero-length past the unit's) its span's first row
    and length, start position, real rows and cache row; then the attention's block table (``table``)."""

    b: int
    rows: int
    packed: torch.Tensor


def table_size(b: int, seqs: int, block_m: int) -> int:
    """Entries of a bucket's block table: every span's blocks fit (at most one partial block a sequence)."""
    return -(-b // block_m) + seqs


def table(spans: list[int], block_m: int, size: int) -> list[int]:
    """The attention's row blocks (``kernels.attention_prefill.attention_prefill_varlen``'s ``blocks``): entry
    ``sequence * 65536 + block``, the later blocks of every sequence first (they read the most keys), then -1."""
    entries = sorted(((m, i) for i, n in enumerate(spans) for m in range(-(-n // block_m))), key=lambda e: -e[0])
    assert len(entries) <= size, (len(entries), size)
    return [i * 65536 + m for m, i in entries] + [-1] * (size - len(entries))


def pack(plan: VarlenPlan, b: int, seqs: int, block_m: int) -> torch.Tensor:
    """``plan``'s tensors in :class:`Layout`'s order, padded to ``b`` rows and ``seqs`` sequences, and its block
    table for ``block_m`` rows a block (a few small launches and one upload once a pass)."""
    r, n = plan.rows, plan.q_lens.numel()
    assert r <= b and n <= seqs and plan.spans is not None, (r, b, n, seqs)
    dev, head = plan.q_lens.device, 3 * b + 5 * seqs
    size = table_size(b, seqs, block_m)
    out = torch.zeros(head + size, dtype=torch.int32, device=dev)
    out[:r] = plan.positions.reshape(-1)
    out[b:b + r] = plan.cache_pos
    out[b + r:2 * b] = -1
    out[2 * b:2 * b + r] = plan.cache_row
    seq = out[3 * b:head].view(5, seqs)
    seq[0:2, :n] = plan.seq_rows
    seq[2, :n], seq[3, :n], seq[4, :n] = plan.start, plan.q_lens, plan.seq_cache_row
    out[head:] = upload_list(table(plan.spans, block_m, size), torch.int32, dev)
    return out


def unpack(buf: torch.Tensor, b: int, seqs: int, block_m: int) -> VarlenPlan:
    """The static views of a bucket's layout buffer as the plan of one unit of ``b`` rows, every row in it (its
    block table where ``block_m`` is known, else none)."""
    head = 3 * b + 5 * seqs
    seq = buf[3 * b:head].view(5, seqs)
    blocks = buf[head:head + table_size(b, seqs, block_m)] if block_m else None
    return VarlenPlan(first=0, row0=0, rows=b, max_rows=b, positions=buf[:b].view(1, b), cache_pos=buf[b:2 * b],
                      cache_row=buf[2 * b:3 * b], seq_rows=seq[0:2], start=seq[2], q_lens=seq[3],
                      seq_cache_row=seq[4], blocks=blocks, block_m=block_m)


class PromptGraphs:
    """The captured prompt layers of one model and slot cache (see the module docstring)."""

    def __init__(self, model, cache, stack_rows: int, seqs: int) -> None:
        self.model, self.cache, self.seqs = model, cache, seqs
        self.buckets = buckets(stack_rows)
        hidden, dev = model.cfg.hidden_size, model.device
        self.states = torch.zeros((2, stack_rows, hidden), dtype=model.dtype, device=dev)
        self.layout_bufs = {b: torch.zeros(3 * b + 5 * seqs + table_size(b, seqs, MIN_BLOCK), dtype=torch.int32,
                                           device=dev) for b in self.buckets}
        self.block_m: dict[int, int] = {}  # bucket -> the attention's rows a block (known once its shapes ran)
        self.loaded: dict[int, torch.Tensor] = {}  # bucket -> the packed layout in its buffer
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph | _Eager] = {}  # (layer, weight address, b)
        self.pool, self.side = None, torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.tile = None  # the dense tile the graphs read (set at capture): kept alive, checked unchanged before use
        self.enabled = True
        self.replays = 0

    # ----- a pass -----
    def usable(self) -> bool:
        """Switched on, and the dense tile the graphs read is still the ops' tile."""
        return self.enabled and self.model.ops._tile is self.tile

    def layouts(self, groups: list, runs: list[list[int]], plans: list[VarlenPlan | None],
                positions: list[torch.Tensor]) -> list[Layout | None]:
        """Each unit's layout (``layout``) where a graph can run it: a stacked unit by its varlen plan, a lone
        prompt slice by a plan of its own."""
        if not self.usable():  # no plan laid out for nothing
            return [None] * len(runs)
        out = []
        for run, plan in zip(runs, plans):
            if plan is None and len(run) == 1:
                plan = plan_unit([groups[run[0]]], [positions[run[0]]], self.model.device, least=1)
            out.append(self.layout(plan))
        return out

    def layout(self, plan: VarlenPlan | None) -> Layout | None:
        """The unit's packed layout when a graph can run it (every row a prompt slice in ``plan``, rows within a
        bucket, at most ``seqs`` sequences), else None."""
        if plan is None or plan.first != 0 or plan.spans is None or not self.usable():
            return None
        fit = [b for b in self.buckets if b >= plan.rows and b in self.block_m]
        if not fit or plan.q_lens.numel() > self.seqs:
            return None
        b = fit[-1]
        return Layout(b, plan.rows, pack(plan, b, self.seqs, self.block_m[b]))

    def run(self, i: int, w: dict, h: torch.Tensor, res: torch.Tensor | None,
            lay: Layout) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer i (weights w) of a unit (states h / res: [1, R, H] stacked, or a lone group's [B, T, H]) by its
        graph: (output, residual) shaped as h, or None when no graph was captured for this layer and weight address
        (run it eagerly)."""
        g = self.graphs.get((i, slot_address(w[_KEY]), lay.b))
        if g is None:
            return None
        r = lay.rows
        base = h._base
        if res is not None and base is not None and base.shape == (2, r, h.shape[-1]) and base.is_contiguous() \
                and h.data_ptr() == base.data_ptr() and res.data_ptr() == base[1].data_ptr():
            self.states[:, :r].copy_(base)  # both from one earlier replay's output: one copy
        else:
            self.states[0, :r].copy_(h.reshape(r, -1))
            if res is not None:
                self.states[1, :r].copy_(res.reshape(r, -1))
        if self.loaded.get(lay.b) is not lay.packed:  # held: its id is never another layout's
            self.layout_bufs[lay.b][:lay.packed.numel()].copy_(lay.packed)  # its table: the bucket's block_m's
            self.loaded[lay.b] = lay.packed
        g.replay()
        self.replays += 1
        out = self.states[:, :r].clone()
        return out[0].view(h.shape), out[1].view(h.shape)

    # ----- capture -----
    def capture_all(self) -> None:
        """Capture every bucket's graphs (largest first, one memory pool): each bucket's shapes run eagerly once
        first (compiles and any tuning left), for a first layer and a later one of each weight source. Writes keys
        at positions below the largest bucket of cache row 0 (a warm-up's: the caller zeroes the cache after)."""
        weights, n = self.model.weights, self.model.cfg.num_hidden_layers
        sources = [(i, weights.resident[i]) for i in range(n) if i in weights.resident]
        plan = getattr(weights, "plan", None)
        slots = range(len(weights.stream.slots)) if plan is not None and plan.num_slots > 0 else ()
        sources += [(i, weights.slot_layer(s, i)) for i in range(n) if i not in weights.resident for s in slots]
        warm = {}  # (first layer?, resident?) -> one layer's weights
        for i, w in sources:
            warm.setdefault((i == 0, i in weights.resident), (i, w))
        cfg = self.model.cfg
        for b in self.buckets:
            for blocks in (False, True):  # the shapes (tuning any left), then the block table's variant
                if blocks:
                    group = cfg.num_attention_heads // cfg.num_key_value_heads
                    self.block_m[b] = varlen_block_m(b, cfg.head_dim, group, self.model.dtype)
                self._warm_layout(b)
                with self._beside():
                    for i, w in warm.values():
                        self._layer_fn(i, w, b)()
            self.tile = self.model.ops._tile  # allocated by now where the layers use one (outside any graph)
            for i, w in sources:
                self.graphs[(i, slot_address(w[_KEY]), b)] = self._capture(self._layer_fn(i, w, b))
        if self.side is not None:
            torch.cuda.synchronize(self.model.device)
        self.loaded.clear()
        log.info("prompt graphs: %d captured, buckets %s", len(self.graphs), self.buckets)

    @contextlib.contextmanager
    def _beside(self):
        """On CUDA: work on the side stream (the capture's), ordered after and before the current stream's."""
        if self.side is None:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def _warm_layout(self, b: int) -> None:
        """One sequence spanning the bucket's rows at positions 0 .. b - 1 of cache row 0 (real work to tune on;
        positions past the RoPE table read its last row, those past the cache write no key)."""
        rows = torch.arange(b, dtype=torch.int32, device=self.model.device)
        buf, head = self.layout_bufs[b], 3 * b + 5 * self.seqs
        buf.zero_()
        buf[:b] = rows.clamp(max=self.model.cos.shape[0] - 1)
        buf[b:2 * b] = torch.where(rows < self.cache.layer(0)[0].shape[2], rows, -1)
        seq = buf[3 * b:head].view(5, self.seqs)
        seq[1, 0], seq[3, 0] = b, b
        if b in self.block_m:
            size = table_size(b, self.seqs, self.block_m[b])
            buf[head:head + size] = upload_list(table([b], self.block_m[b], size), torch.int32, buf.device)

    def _layer_fn(self, i: int, w: dict, b: int):
        model, states = self.model, self.states
        plan = unpack(self.layout_bufs[b], b, self.seqs, self.block_m.get(b, 0))
        kv = lambda: self.cache.layer(i)  # noqa: E731

        def run() -> None:
            h = states[0, :b].view(1, b, -1)
            res = None if i == 0 else states[1, :b].view(1, b, -1)
            ops = model.ops
            saved = ops.mlp_budget, ops.mlp_pieces
            ops.mlp_budget, ops.mlp_pieces = ((0, 1 << 62), PIECES) if b >= PIECES_FROM else (None, None)
            try:
                with ops.pass_scope():
                    out, r = model.layer_stacked(w, h, res, [None], [None], [None], None, (plan, kv))
            finally:
                ops.mlp_budget, ops.mlp_pieces = saved
            states[1, :b].copy_(r.view(b, -1))
            states[0, :b].copy_(out.view(b, -1))
        return run

    def _capture(self, fn):
        if self.side is None:  # a CPU model (tests): "replaying" runs the layer with the same static buffers
            return _Eager(fn)
        g = torch.cuda.CUDAGraph()
        with capture(g, self.side, self.pool):
            fn()
        self.pool = self.pool or g.pool()
        return g


class _Eager:
    """What a capture gives on a CPU model: its replay runs the function (tests check the padded layouts)."""

    def __init__(self, fn) -> None:
        self.replay = fn


def try_capture(model, cache, stack_rows: int, seqs: int) -> PromptGraphs | None:
    """Capture the prompt graphs, or None (and say why) when they cannot be."""
    if model.device.type == "cuda":
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graphs' pool takes their room under the budget
    try:
        graphs = PromptGraphs(model, cache, stack_rows, seqs)
        graphs.capture_all()
        return graphs
    except Exception as e:  # an optimisation: passes run their units eagerly
        log.warning("prompt graphs not captured (%s); prompt units run eagerly", e)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return None
