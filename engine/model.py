"""The decoder forward pass, written once against an ops backend and a weight source.

A layer's weights are *bound* at run time: the model asks its ``WeightSource`` for layer
i (resident tensors, or a staging slot the streamer filled), runs it, and releases it,
which lets the streamer reuse the slot. The model owns no parameters.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import TYPE_CHECKING

import torch

from engine import head_ahead
from engine.config import ModelConfig
from engine.decoder import DecoderLayers
from engine.groups import Group, WeightSource
from engine.kv_cache import KVCache
from engine.ops import TorchOps
from engine.prefill_states import DeviceStates, HostStates, interleave_weights
from engine.stacking import run_pick, stacked_runs
from engine.state_parking import Parking, free_row_spans, kv_tail_spans, parking_enabled
from engine.varlen import VarlenPlan, plan_unit
from engine.varlen import enabled as varlen_enabled
from kernels.rope import rope_tables
from kernels.tuning import picks_like, untuned

if TYPE_CHECKING:
    from engine.graph_unit import GraphUnit


class Model(DecoderLayers):
    """Qwen2/2.5, Qwen3, Llama and Mistral decoder over a ``WeightSource``."""

    def __init__(self, cfg: ModelConfig, weights: WeightSource, ops: TorchOps, device: torch.device,
                 dtype: torch.dtype, max_positions: int) -> None:
        self.cfg, self.weights, self.ops = cfg, weights, ops
        self.device, self.dtype = torch.device(device), dtype
        cos, sin = rope_tables(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self.scale = cfg.head_dim ** -0.5
        self.host = None  # engine.host_lane.HostLane: decode steps compute its layers on the CPU
        self.host_states = False  # a prefill keeps the prompt states in host memory between layers (the plan's)
        self.state_host_bytes = 0  # prompt-state bytes copied between host and device so far (both ways)
        self.parked_passes = 0  # passes whose host states waited in unreached KV positions instead
        self._head_lent = False  # this pass lent the streamer pieces for the lm_head's chunks
        self.lend_head = True  # a long prompt pass may copy a streamed lm_head ahead (engine.head_ahead)
        self.prompt_graphs = None  # engine.prompt_graphs.PromptGraphs: a served pass's prompt units replay graphs

    def forward(self, ids: torch.Tensor, start_pos: torch.Tensor, q_lens: torch.Tensor, cache: KVCache,
                max_len: int, last_only: bool = True) -> torch.Tensor:
        """Run ids [B, T] at positions start_pos[b] + t; return fp32 logits.

        ``q_lens[b]`` tokens of row b are real (the rest is right padding); ``max_len`` is
        max(start_pos + q_lens), known on the host. With ``last_only`` the logits are
        [B, V] for each sequence's last real token, else [B, T, V].
        """
        b, t = ids.shape
        host = self.host if self.host is not None and cache is self.host.cache else None
        on_host = host.layers if host is not None and host.serves(cache, t) else ()
        if self.host is not None:  # another cache (a server's): every non-resident layer streams
            self.weights.host_decode(bool(on_host))
        h = self.weights.embed(ids, self.ops.embedding)
        positions = self.positions(start_pos, t)
        residual = None
        with self.ops.pass_scope():  # start_pos + q_lens once, not once a layer
            for i in range(self.cfg.num_hidden_layers):
                kv = tuple(c[:b] for c in cache.layer(i))  # the first b rows: fewer prompts than cache.batch
                if i in on_host:  # the first layer of a run of host layers runs the whole run on the host
                    if i - 1 not in on_host:
                        h, residual = host.run(host.run_from(i), h, residual, start_pos, q_lens)
                    continue
                w = self.weights.layer(i)
                h, residual = self.layer(w, h, residual, positions, kv, start_pos, q_lens, max_len)
                self.weights.release(i)
                if host is not None:
                    host.absorb(i, kv, max_len)  # a streamed pass over a host layer: its keys go to the host too
        return self.head(h, residual, q_lens, last_only)

    def prefill(self, ids: torch.Tensor, lens: list[int], chunk: int, cache: KVCache,
                chunk_context=None) -> torch.Tensor:
        """Prompts ids [B, T] (right-padded; row b has ``lens[b]`` tokens) layer-major: each layer's
        weights are fetched once and every ``chunk``-token slice of the prompts runs through them
        before the next layer, so a streamed layer crosses PCIe once per prompt, not once per chunk.
        The hidden states of the whole prompt wait between layers, on the device or, with ``host_states``,
        in host memory (``engine.prefill_states``). Returns fp32 logits [B, V] of each row's last token.
        ``chunk_context(rows)`` wraps each slice's work (the ops' prompt_chunk)."""
        b, t = ids.shape
        bounds = [(c0, min(t, c0 + chunk)) for c0 in range(0, t, chunk)]
        groups = [Group(ids[:, c0:c1], torch.full((b,), c0, dtype=torch.int32, device=self.device),
                        torch.tensor([max(0, min(n, c1) - c0) for n in lens], dtype=torch.int32, device=self.device),
                        0, c1) for c0, c1 in bounds]
        last = [(n - 1) // chunk for n in lens]  # the slice holding each row's last token
        pick = [(last[r], r, lens[r] - 1 - bounds[last[r]][0]) for r in range(b)]
        host = self.host if self.host is not None and cache is self.host.cache else None
        after = None
        if host is not None:
            self.weights.host_decode(False)  # a prefill streams the host layers too
            after = lambda i: host.absorb(i, tuple(c[:b] for c in cache.layer(i)), t)  # noqa: E731
        return self.forward_groups(groups, cache, pick, chunk_context, after, self.host_states, park=True)

    def forward_groups(self, groups: list[Group], cache: KVCache | None, pick: list[tuple[int, int, int]],
                       chunk_context=None, after_layer=None, host_states: bool = False,
                       park: bool | list[torch.Tensor] = False, stack_rows: int = 0,
                       stack_free: set[int] | None = None, spare_rows: list[int] | None = None,
                       decode_graph: GraphUnit | None = None) -> torch.Tensor:
        """Run several groups of sequences through one pass over the layers: each layer's weights are
        fetched once and every group (in order) runs through them, each on its own rows of the KV cache
        and with its own token count, so prompt slices and single decode tokens share a pass without
        padding one to the other. Returns fp32 logits [len(pick), V] of the tokens ``pick`` names as
        (group, row in the group, token index). ``after_layer(i)`` runs after layer i's groups.
        ``host_states``: the groups' states wait in host memory between layers (``engine.prefill_states``), where
        the pass has more than one unit (a unit alone keeps its states on the device).
        ``park``: True: the groups are all the rows in use of a contiguous ``cache``, so host states that fit
        its unreached positions wait there instead (``engine.state_parking``); a list: flat spans of KV memory
        nothing reads during the pass (a paged cache's unused blocks) to park them in. ``cache`` may be None
        when every group brings its own ``kv``. ``stack_rows`` > 0: groups whose token rows add up to at most that
        many run each layer together (``layer_stacked``), their states one unit: consecutive prompt groups, or with
        ``stack_free`` (the groups that may run in any order) packed into as few units as fit, the decode group
        heading the first (``engine.stacking``). A pass of a prefill chunk's tokens or more may copy a streamed
        lm_head ahead (``engine.head_ahead``) and widen each layer's packed weights once for its units
        (``engine.dense_layer``), into the KV rows ``spare_rows`` of a contiguous ``cache`` (rows no sequence holds)
        where given. ``decode_graph``: the first group, decoding rows alone in the first unit, runs by the decode
        step's graphs (``engine.graph_unit``; its states on the device)."""
        graphs = self.prompt_graphs if self.prompt_graphs is not None and self.prompt_graphs.cache is cache else None
        rows = sum(g.ids.numel() for g in groups)
        runs = stacked_runs(groups, stack_rows, stack_free)  # the states' units: a group, or a stack [1, rows]
        # one unit never waits between layers for another: its states stay on the device, as a lone group's do
        # (host states of one unit wait for their own copies out, a host sync a layer where they cannot park)
        host_states = host_states and len(runs) > 1
        assert decode_graph is None or (runs[0] == [0] and not host_states and not spare_rows), "graph unit misplaced"
        spans = (lambda: free_row_spans(cache, spare_rows)) if spare_rows and isinstance(cache, KVCache) else None
        layer, head = head_ahead.split(self, rows, len(runs), host_states, graphs is not None, spans)
        lent = self.weights.lend_head(head) if head is not None else 0
        self._head_lent = bool(lent)
        try:
            return self._forward_groups(groups, cache, pick, chunk_context, after_layer, host_states, park,
                                        runs, graphs, layer, decode_graph)
        finally:
            self._head_lent = False
            if lent:
                self.weights.take_head_back()

    def _forward_groups(self, groups: list[Group], cache: KVCache | None, pick: list[tuple[int, int, int]],
                        chunk_context, after_layer, host_states: bool, park: bool | list[torch.Tensor],
                        runs: list[list[int]], graphs, layer, decode_graph: GraphUnit | None) -> torch.Tensor:
        ctx = chunk_context or (lambda rows: contextlib.nullcontext())
        positions = [self.positions(g.start_pos, g.ids.shape[1]) for g in groups]
        n = self.cfg.num_hidden_layers
        shapes = [tuple(groups[r[0]].ids.shape) if len(r) == 1 else (1, sum(groups[k].ids.numel() for k in r))
                  for r in runs]
        embed = lambda u: (decode_graph.states()[0] if u == 0 and decode_graph is not None  # noqa: E731
                           else self.weights.embed(self._run_ids(groups, runs[u]), self.ops.embedding))
        parking = self._parking(groups, shapes, cache, park) if host_states and park is not False else None
        self.parked_passes += parking is not None
        unit_pick = run_pick(groups, runs, pick)
        plans = [plan_unit([groups[k] for k in run], [positions[k] for k in run], self.device)
                 if len(run) > 1 and self.ops.varlen and varlen_enabled() else None for run in runs]
        states = (HostStates(shapes, embed, n, unit_pick, self.device, park=parking)
                  if host_states else DeviceStates(len(runs), embed))
        # the weight copies interleave with the states' (host states only: parked ones do not cross PCIe)
        pump = host_states and parking is None and interleave_weights() and len(runs) > 1
        share = list(itertools.accumulate(b * t for b, t in shapes)) if pump else []  # tokens up to unit u
        lays = graphs.layouts(groups, runs, plans, positions) if graphs is not None else [None] * len(runs)
        try:
            self.weights.meter(pump)
            with self.ops.pass_scope():  # start_pos + q_lens once, not once a layer
                for i in range(n):
                    w = self.weights.layer(i)
                    if pump:
                        self.weights.pump_start()
                    shared: list = []  # cache.layer(i), fetched once when a group needs it
                    # its packed weights widened once for the units (engine.dense_layer), where ``layer`` carves
                    with self.ops.dense_layer(None if layer is None else layer()):
                        for u, run in enumerate(runs):
                            if u == 0 and decode_graph is not None:  # the decode rows by the decode step's graphs
                                states.put(0, *decode_graph.layer(i, w))
                                continue
                            h, res = states.get(u)  # queues the next unit's states in
                            if pump:  # then this unit's share of the next streamed layer
                                self.weights.pump_to(share[u] / share[-1])
                            out = None if lays[u] is None else graphs.run(i, w, h, res, lays[u])
                            if out is not None:
                                h, res = out
                            else:
                                with ctx(shapes[u][0] * shapes[u][1]):
                                    h, res = self._unit_layer(w, i, h, res, [groups[k] for k in run],
                                                              [positions[k] for k in run], cache, shared, ctx,
                                                              plans[u])
                            states.put(u, h, res)
                            del h, res  # the states object decides how long a unit's output lives
                    self.weights.release(i)
                    if after_layer is not None:
                        after_layer(i)
        finally:
            states.close()  # host states: their copies end before the buffers they use are freed
            self.weights.meter(False)
        h, residual = states.pick(unit_pick)
        x, _ = self.ops.add_rmsnorm(h, residual, self.weights.norm(), self.cfg.rms_norm_eps)
        self.state_host_bytes += states.moved_bytes
        return self._logits(x)

    def _unit_layer(self, w: dict[str, torch.Tensor], i: int, h: torch.Tensor, res: torch.Tensor | None,
                    groups: list[Group], positions: list[torch.Tensor], cache: KVCache | None,
                    shared: list, ctx=None, plan: VarlenPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i (weights w) of one states unit: one group, or several stacked (``layer_stacked``, each
        group's attention under ``ctx(its rows)``; the prompt slices ``plan`` lays out in one launch each)."""
        # each group's keys and values fetched right before its attention (a paged cache's gathered copy of
        # one group is written back when the next is fetched)
        kvs = [functools.partial(self._group_kv, g, i, cache, shared) for g in groups]
        if len(groups) > 1:
            varlen = None if plan is None else (plan, functools.partial(self._layer_kv, i, cache, shared))
            return self.layer_stacked(w, h, res, groups, positions, kvs, ctx, varlen)
        g = groups[0]
        return self.layer(w, h, res, positions[0], kvs[0](), g.start_pos, g.q_lens, g.max_len)

    @staticmethod
    def _run_ids(groups: list[Group], run: list[int]) -> torch.Tensor:
        """A unit's token ids: a group's [B, T], or a run's rows flattened in order into [1, R]."""
        if len(run) == 1:
            return groups[run[0]].ids
        return torch.cat([groups[k].ids.reshape(1, -1) for k in run], dim=1)

    @staticmethod
    def _group_kv(g: Group, i: int, cache: KVCache | None, shared: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Group g's layer-i keys and values: its own view, or its rows of ``cache.layer(i)`` (fetched into
        ``shared`` by the first group that needs it)."""
        if g.kv is not None:
            return g.kv(i)
        k_cache, v_cache = Model._layer_kv(i, cache, shared)
        return k_cache[g.row0:g.row0 + g.ids.shape[0]], v_cache[g.row0:g.row0 + g.ids.shape[0]]

    @staticmethod
    def _layer_kv(i: int, cache: KVCache, shared: list) -> tuple[torch.Tensor, torch.Tensor]:
        """``cache.layer(i)``, fetched into ``shared`` once a layer."""
        if not shared:
            shared.append(cache.layer(i))
        return shared[0]

    def _parking(self, groups: list[Group], shapes: list[tuple[int, int]], cache: KVCache | None,
                 park: bool | list[torch.Tensor]) -> Parking | None:
        """The spans ``park`` names, or the unreached positions of a contiguous cache past every group's rows'
        ends, when the states of every unit (``shapes``: [B, T] each) fit there (``engine.state_parking``);
        else None."""
        if not parking_enabled():
            return None
        if isinstance(park, list):
            spans = park
        elif not isinstance(cache, KVCache) or any(g.kv is not None for g in groups):
            return None
        else:
            ends: dict[int, int] = {}
            for g in groups:
                for r in range(g.row0, g.row0 + g.ids.shape[0]):
                    ends[r] = max(ends.get(r, 0), g.max_len)
            spans = kv_tail_spans(cache, ends)
        parking = Parking(spans)
        need = [2 * b * t * self.cfg.hidden_size for b, t in shapes]  # hidden states and residual
        return parking if parking.fits(need, self.dtype) else None

    def positions(self, start_pos: torch.Tensor, t: int) -> torch.Tensor:
        """Positions [B, t] of a pass starting at start_pos [B], clamped to the RoPE table."""
        pos = start_pos.long().view(-1, 1) + torch.arange(t, device=self.device)
        return pos.clamp(max=self.cos.shape[0] - 1)

    def head(self, h: torch.Tensor, residual: torch.Tensor, q_lens: torch.Tensor,
             last_only: bool = True) -> torch.Tensor:
        """Final norm and lm_head over the last layer's output: fp32 logits."""
        if last_only:
            rows = torch.arange(h.shape[0], device=self.device)
            idx = (q_lens.long() - 1).clamp(min=0)
            h, residual = h[rows, idx], residual[rows, idx]
        x, _ = self.ops.add_rmsnorm(h, residual, self.weights.norm(), self.cfg.rms_norm_eps)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], self.cfg.vocab_size, dtype=torch.float32, device=self.device)
        whole = None  # a chunk's rows (the first comes through the ring: engine.head_ahead lends the later ones)
        for row, weight in self.weights.lm_head_parts():
            whole = whole or weight.shape[0]
            # a lent piece's rows follow the free spans: the whole chunk's launch config, untimed
            with untuned() if self._head_lent else contextlib.nullcontext(), picks_like(whole):
                out[..., row: row + weight.shape[0]] = self.ops.linear(x, weight).float()
        return out
