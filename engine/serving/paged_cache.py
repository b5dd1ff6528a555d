"""Paged KV storage for the model's contiguous-cache ops: gather each layer through the block tables.

Keys and values live in blocks ``[L, N + 1, Hk, block_size, D]`` (block N is a scratch block that
pads short tables). ``Model.forward`` asks ``cache.layer(i)`` for a ``[B, Hk, S, D]`` pair: for the
bound step that is a gathered copy of each row's blocks, in which ``kv_append_`` and attention run
unchanged. Before the next layer is gathered (and at ``finish``) the positions this step computed
are written back into their blocks; padding positions never are. That copy costs one read of the
step's context per layer.

Decode steps (one token per row) with the Triton kernels skip the copy: ``layer(i)`` then returns
:class:`PagedLayer` handles, and :class:`PagedOps` (installed on the model) writes each new key and
value straight into its block and runs ``kernels.attention_decode_paged`` through the block table.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig


class PagedKVCache:
    """``num_blocks`` blocks of ``block_size`` positions for every layer."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (cfg.num_hidden_layers, num_blocks + 1, cfg.num_key_value_heads, block_size, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, torch.device(device)
        self._bound: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._direct = False  # the bound step is served through PagedLayer handles
        self.direct_steps = 0

    def can_read_directly(self) -> bool:
        """Whether the block-table kernel can read these blocks (a power-of-two block size >= 16)."""
        bs = self.block_size
        return bs >= 16 and bs & (bs - 1) == 0
    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bind(self, tables: list[list[int]], start: list[int], q_lens: list[int], t: int,
             direct: bool = False) -> None:
        """Set up one step: row r's blocks, and the positions start[r] .. start[r] + q_lens[r] it writes.
        ``direct`` (t == 1, PagedOps on the model): hand out PagedLayer handles instead of gathered copies."""
        assert not direct or (t == 1 and self.can_read_directly())
        bs = self.block_size
        nblk = max(1, -(-(max(start) + t) // bs))  # every padded position of the step stays inside the view
        idx = torch.full((len(tables), nblk), self.num_blocks, dtype=torch.long)
        for r, blocks in enumerate(tables):
            assert len(blocks) * bs >= start[r] + q_lens[r], "the table does not cover the step's positions"
            blocks = blocks[:nblk]
            idx[r, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        rows = [r for r, n in enumerate(q_lens) for _ in range(n)]
        pos = [start[r] + j for r, n in enumerate(q_lens) for j in range(n)]
        rows_t, pos_t = torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
        blk = idx[rows_t, pos_t // bs]
        dev = self.device
        self._bound = (idx.to(dev), rows_t.to(dev), pos_t.to(dev), blk.to(dev))
        self._direct = direct
        if direct:
            self._tables32 = self._bound[0].to(torch.int32)
            self.direct_steps += 1

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's gathered [B, Hk, S, D] keys and values for the bound step."""
        assert self._bound is not None, "bind() a step first"
        if self._direct:
            _, rows, pos, blk = self._bound
            where = (rows, blk, pos % self.block_size)
            return PagedLayer(self.k[i], self._tables32, where), PagedLayer(self.v[i], self._tables32, where)
        self._write_back()
        idx = self._bound[0]
        b, nblk = idx.shape
        _, _, hk, bs, d = self.k.shape
        k = self.k[i][idx].permute(0, 2, 1, 3, 4).reshape(b, hk, nblk * bs, d)
        v = self.v[i][idx].permute(0, 2, 1, 3, 4).reshape(b, hk, nblk * bs, d)
        self._pending = (i, k, v)
        return k, v

    def finish(self) -> None:
        """Write the last layer's new positions back and unbind."""
        self._write_back()
        self._bound = None

    def _write_back(self) -> None:
        if self._pending is None:
            return
        i, k, v = self._pending
        _, rows, pos, blk = self._bound
        off = pos % self.block_size
        self.k[i][blk, :, off] = k[rows, :, pos]
        self.v[i][blk, :, off] = v[rows, :, pos]
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
    """The engine's ops; ``kv_append_`` and ``attention`` also take :class:`PagedLayer` caches."""

    def __init__(self, base) -> None:
        self.base = base

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def kv_append_(self, k, v, k_cache, v_cache, start_pos) -> None:
        if not isinstance(k_cache, PagedLayer):
            return self.base.kv_append_(k, v, k_cache, v_cache, start_pos)
        k_cache.write(k)
        v_cache.write(v)

    def attention(self, q, k_cache, v_cache, start_pos, q_lens, scale, max_len):
        if not isinstance(k_cache, PagedLayer):
            return self.base.attention(q, k_cache, v_cache, start_pos, q_lens, scale, max_len)
        from kernels.attention_decode_paged import attention_decode_paged

        out = attention_decode_paged(q[:, 0], k_cache.blocks, v_cache.blocks, k_cache.tables, start_pos + q_lens,
                                     scale)
        return out.unsqueeze(1)
