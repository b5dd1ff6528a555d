"""Paged KV storage for the model's contiguous-cache ops: gather each layer through the block tables.

Keys and values live in blocks ``[L, N + 1, Hk, block_size, D]`` (block N is a scratch block that
pads short tables). ``Model.forward`` asks ``cache.layer(i)`` for a ``[B, Hk, S, D]`` pair: for the
bound step that is a gathered copy of each row's blocks, in which ``kv_append_`` and attention run
unchanged. Before the next gather (and at ``finish``) the positions this step computed are written
back into their blocks; padding positions never are. That copy costs one read of the step's context
per layer.

A grouped step (``bind_groups``, for ``Model.forward_groups``) binds several groups of rows at once,
each with its own tables and token count: ``group_layer(k, i)`` gathers only group k's rows, so a
prompt slice's copy holds its own context and the decode rows' copy theirs.

Decode steps and groups (one token per row) with the Triton kernels skip the copy: their layers are
then :class:`PagedLayer` handles, and :class:`PagedOps` (installed on the model) writes each new key
and value straight into its block and runs ``kernels.attention_decode_paged`` through the block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.state_parking import block_run_spans
from engine.upload import upload


@dataclass(frozen=True)
class BindSpec:
    """One group's rows: their blocks, and the positions start[r] .. start[r] + q_lens[r] row r writes
    (``t`` tokens a row, padding included); ``direct`` (t == 1): served through PagedLayer handles."""

    tables: list[list[int]]
    start: list[int]
    q_lens: list[int]
    t: int
    direct: bool = False


@dataclass(frozen=True)
class _Binding:
    idx: torch.Tensor  # [B, nblk] block ids, scratch-padded
    rows: torch.Tensor  # the real tokens' row, position and block
    pos: torch.Tensor
    blk: torch.Tensor
    direct: bool
    tables32: torch.Tensor | None


class PagedKVCache:
    """``num_blocks`` blocks of ``block_size`` positions for every layer."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (cfg.num_hidden_layers, num_blocks + 1, cfg.num_key_value_heads, block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        self._bound: list[_Binding] | None = None
        self._pending: tuple[_Binding, int, torch.Tensor, torch.Tensor] | None = None
        self.direct_steps = 0  # steps with a group served in place

    def can_read_directly(self) -> bool:
        """Whether the block-table kernel can read these blocks (a power-of-two block size >= 16)."""
        bs = self.block_size
        return bs >= 16 and bs & (bs - 1) == 0

    def unused_spans(self, blocks) -> list[torch.Tensor]:
        """Flat views of ``blocks`` (never-used ones: nothing reads them before a sequence is handed one
        and writes it) in every layer's keys and values, where a pass's prompt states may wait
        (``engine.state_parking``)."""
        assert all(0 <= b < self.num_blocks for b in blocks), "the scratch block is never unused"
        return block_run_spans((self.k, self.v), blocks)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bind(self, tables: list[list[int]], start: list[int], q_lens: list[int], t: int,
             direct: bool = False) -> None:
        """Set up one step: row r's blocks, and the positions start[r] .. start[r] + q_lens[r] it writes.
        ``direct`` (t == 1, PagedOps on the model): hand out PagedLayer handles instead of gathered copies."""
        self.bind_groups([BindSpec(tables, start, q_lens, t, direct)])

    def bind_groups(self, specs: list[BindSpec]) -> None:
        """Set up a grouped step: group k's layers come from ``group_layer(k, i)``. A gathered copy still pending is a
        failed pass's (``finish`` ends every pass that ran through): dropped, not written back, since its blocks may
        belong to other sequences by now (written after their keys, it corrupted them)."""
        self._pending = None
        self._bound = [self._binding(s) for s in specs]
        self.direct_steps += any(s.direct for s in specs)

    def _binding(self, spec: BindSpec) -> _Binding:
        assert not spec.direct or (spec.t == 1 and self.can_read_directly())
        bs, start, q_lens = self.block_size, spec.start, spec.q_lens
        nblk = max(1, -(-(max(start) + spec.t) // bs))  # every padded position of the step stays inside the view
        idx = torch.full((len(spec.tables), nblk), self.num_blocks, dtype=torch.long)
        for r, blocks in enumerate(spec.tables):
            assert len(blocks) * bs >= start[r] + q_lens[r], "the table does not cover the step's positions"
            blocks = blocks[:nblk]
            idx[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        rows = [r for r, n in enumerate(q_lens) for _ in range(n)]
        pos = [start[r] + j for r, n in enumerate(q_lens) for j in range(n)]
        rows_t, pos_t = torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
        blk = idx[rows_t, pos_t // bs]
        dev = self.device
        idx = upload(idx, dev)
        return _Binding(idx, upload(rows_t, dev), upload(pos_t, dev), upload(blk, dev), spec.direct,
                        idx.to(torch.int32) if spec.direct else None)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's gathered [B, Hk, S, D] keys and values for the bound step."""
        assert self._bound is not None and len(self._bound) == 1, "bind() a step first"
        return self.group_layer(0, i)

    def group_layer(self, k: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values of bound group k: PagedLayer handles, or a gathered copy of its rows."""
        assert self._bound is not None, "bind_groups() a step first"
        b = self._bound[k]
        if b.direct:
            where = (b.rows, b.blk, b.pos % self.block_size)
            return PagedLayer(self.k[i], b.tables32, where), PagedLayer(self.v[i], b.tables32, where)
        self._write_back()
        rows, nblk = b.idx.shape
        _, _, hk, bs, d = self.k.shape
        kk = self.k[i][b.idx].permute(0, 2, 1, 3, 4).reshape(rows, hk, nblk * bs, d)
        vv = self.v[i][b.idx].permute(0, 2, 1, 3, 4).reshape(rows, hk, nblk * bs, d)
        self._pending = (b, i, kk, vv)
        return kk, vv

    def finish(self) -> None:
        """Write the last gathered copy's new positions back and unbind."""
        self._write_back()
        self._bound = None

    def abandon(self) -> None:
        """Forget a failed pass's binding and its last gathered copy (the pass runs again from its start)."""
        self._pending = self._bound = None

    def _write_back(self) -> None:
        if self._pending is None:
            return
        b, i, k, v = self._pending
        off = b.pos % self.block_size
        self.k[i][b.blk, :, off] = k[b.rows, :, b.pos]
        self.v[i][b.blk, :, off] = v[b.rows, :, b.pos]
        self._pending = None


class PagedLayer:
    """One layer's key (or value) blocks and the bound step's tables, in place of a [B, Hk, S, D] cache."""

    def __init__(self, blocks: torch.Tensor, tables: torch.Tensor,
                 where: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.blocks, self.tables = blocks, tables
        self.rows, self.block_ids, self.offsets = where  # the step's real tokens: row, block, offset

    def __getitem__(self, rows: slice) -> PagedLayer:
        """``Model.forward`` takes the first B rows of a cache: the tables already have B rows."""
        return self

    def write(self, x: torch.Tensor) -> None:
        """Store x [B, 1, Hk, D] (this step's keys or values) into the blocks of the real tokens."""
        self.blocks[self.block_ids, :, self.offsets] = x[self.rows, 0].to(self.blocks.dtype)


class PagedOps:
    """The engine's ops; ``kv_append_``, ``attention`` and ``attention_o`` also take :class:`PagedLayer` caches."""

    def __init__(self, base) -> None:
        self.base = base

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def rope_kv_append_(self, q, k, v, cos, sin, positions, k_cache, v_cache, start_pos) -> None:
        if not isinstance(k_cache, PagedLayer):
            return self.base.rope_kv_append_(q, k, v, cos, sin, positions, k_cache, v_cache, start_pos)
        self.base.rope_(q, k, cos, sin, positions)
        self.kv_append_(k, v, k_cache, v_cache, start_pos)

    def kv_append_(self, k, v, k_cache, v_cache, start_pos) -> None:
        if not isinstance(k_cache, PagedLayer):
            return self.base.kv_append_(k, v, k_cache, v_cache, start_pos)
        k_cache.write(k)
        v_cache.write(v)

    def attention(self, q, k_cache, v_cache, start_pos, q_lens, scale, max_len):
        if not isinstance(k_cache, PagedLayer):
            return self.base.attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
        from kernels.attention_decode_paged import attention_decode_paged

        out = attention_decode_paged(q[:, 0], k_cache.blocks, v_cache.blocks, k_cache.tables,
                                     self.base.seq_lens(start_pos, q_lens), scale)
        return out.unsqueeze(1)

    def attention_o(self, q, k_cache, v_cache, start_pos, q_lens, scale, max_len, w_o):
        if not isinstance(k_cache, PagedLayer):
            return self.base.attention_o(q, k_cache, v_cache, start_pos, q_lens, scale, max_len, w_o)
        b, t = q.shape[:2]  # the paged attention, then o_proj (its rounding stays a launch of its own here)
        attn = self.attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
        return self.base.linear(attn.reshape(b, t, -1), w_o)
