"""Paged KV bookkeeping: fixed-size blocks, a block table per sequence, prefix reuse, LRU eviction.

A block holds ``block_size`` token positions of every layer. A *full* block is identified by a
chained digest (SHA-256 of its tokens and the digest of the block before it), so equal prefixes (a shared
system prompt, the earlier turns of a chat) map to the same blocks; a hit is also checked against the
stored tokens. The digest stands for the whole prefix: Python's ``hash`` did not (integers hash modulo
2**61 - 1, so two chains could be made to meet, and a client could then be handed keys and values computed
after another client's prefix). Blocks are refcounted; a
full block nobody uses stays cached and is evicted least-recently-used when a fresh block is needed.

Admission is preemption-free: a sequence is admitted only when the blocks it may ever need (prompt
plus ``max_tokens``, at most the context) fit next to what the running sequences may still need, so
a running sequence never waits for a block and is never evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field


def chain_hash(prev: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The digest of a full block given the digest of the block before it (None for the first): SHA-256 over the
    previous digest and the tokens (as int64), collision-resistant where the prefix it stands for matters."""
    h = hashlib.sha256(prev if prev is not None else b"first block")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockAllocator:
    """Refcounted blocks; refcount-0 blocks with a hash are kept (LRU) for prefix reuse."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # no hash, refcount 0
        self.lru: OrderedDict[int, None] = OrderedDict()  # hash, refcount 0; oldest first

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unused)."""
        return len(self.free) + len(self.lru)

    @property
    def in_use(self) -> int:
        return self.num_blocks - self.available

    def lookup(self, prev: bytes | None, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding exactly ``tokens`` after the chain ``prev``, or None."""
        block = self.by_hash.get(chain_hash(prev, tokens))
        return block if block is not None and self.tokens[block] == tokens else None

    def acquire(self, block: int) -> None:
        """Take a reference to a cached block (taking it off the LRU list when unused)."""
        if self.refs[block] == 0:
            assert block in self.lru, f"block {block} is neither used nor cached"
            del self.lru[block]
        self.refs[block] += 1

    def allocate(self) -> int:
        """A fresh block (refcount 1): a never-hashed one first, else the least recently used cached one."""
        if self.free:
            block = self.free.popleft()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            self._forget(block)
        else:
            raise RuntimeError("no free KV block (admission must reserve blocks first)")
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        """Drop a reference; an unused block stays cached (most recently used) if it has a hash."""
        assert self.refs[block] > 0, f"block {block} released more often than acquired"
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.hashes[block] is None:
                self.free.append(block)
            else:
                self.lru[block] = None

    def register(self, block: int, prev: bytes | None, tokens: tuple[int, ...]) -> bytes:
        """Record that ``block`` is full with ``tokens``; return its chained digest."""
        assert len(tokens) == self.block_size and self.refs[block] > 0
        h = chain_hash(prev, tokens)
        if h not in self.by_hash:  # an equal block cached earlier keeps serving lookups
            self.by_hash[h] = block
            self.hashes[block], self.tokens[block] = h, tokens
        return h

    def _forget(self, block: int) -> None:
        h = self.hashes[block]
        if h is not None and self.by_hash.get(h) == block:
            del self.by_hash[h]
        self.hashes[block] = self.tokens[block] = None


@dataclass
class BlockTable:
    """One sequence's blocks; the first ``hashed`` are full and registered, ``last_hash`` ends their chain."""

    blocks: list[int] = field(default_factory=list)
    hashed: int = 0
    last_hash: bytes | None = None
    worst: int = 0  # blocks it may ever need (its reservation)


class BlockManager:
    """Block tables of the running sequences over a :class:`BlockAllocator`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.alloc = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.tables: dict[int, BlockTable] = {}
        self.hits = 0  # prompt tokens served from cached blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _match(self, prompt: list[int]) -> list[int]:
        """Cached blocks of the prompt's prefix, leaving at least its last token to compute."""
        out, prev, bs = [], None, self.block_size
        for i in range((len(prompt) - 1) // bs):
            tokens = tuple(prompt[i * bs:(i + 1) * bs])
            block = self.alloc.lookup(prev, tokens)
            if block is None:
                break
            out.append(block)
            prev = chain_hash(prev, tokens)
        return out

    def _still_needed(self) -> int:
        return sum(t.worst - len(t.blocks) for t in self.tables.values())

    def can_admit(self, prompt: list[int], max_total: int) -> bool:
        """Whether the sequence's worst case fits beside the running ones' (never preempting them)."""
        matched = self._match(prompt)
        unused_hits = sum(1 for b in matched if self.alloc.refs[b] == 0)  # leave the free pool on acquire
        need = self.blocks_for(max_total) - len(matched) + unused_hits
        return self._still_needed() + need <= self.alloc.available

    def admit(self, seq_id: int, prompt: list[int], max_total: int) -> int:
        """Take the cached prefix blocks; return how many prompt tokens they already hold."""
        assert seq_id not in self.tables and self.can_admit(prompt, max_total)
        matched = self._match(prompt)
        table = BlockTable(worst=self.blocks_for(max_total))
        for b in matched:
            self.alloc.acquire(b)
            table.last_hash = chain_hash(table.last_hash, tuple(prompt[table.hashed * self.block_size:
                                                                       (table.hashed + 1) * self.block_size]))
            table.blocks.append(b)
            table.hashed += 1
        self.tables[seq_id] = table
        self.hits += len(matched) * self.block_size
        return len(matched) * self.block_size

    def reserve(self, seq_id: int, tokens: int) -> list[int]:
        """Make the sequence's table cover ``tokens`` positions; return the table."""
        table = self.tables[seq_id]
        while len(table.blocks) * self.block_size < tokens:
            assert len(table.blocks) < table.worst, "a sequence outgrew its reservation"
            table.blocks.append(self.alloc.allocate())
        return table.blocks

    def computed(self, seq_id: int, ids: list[int], num_computed: int) -> None:
        """Register the blocks that ``num_computed`` tokens (of ``ids``) filled, for later reuse."""
        table, bs = self.tables[seq_id], self.block_size
        while (table.hashed + 1) * bs <= num_computed:
            tokens = tuple(ids[table.hashed * bs:(table.hashed + 1) * bs])
            table.last_hash = self.alloc.register(table.blocks[table.hashed], table.last_hash, tokens)
            table.hashed += 1

    def clear(self) -> None:
        """Forget every table and every cached block (a fresh allocator): nothing from before is reused."""
        self.alloc = BlockAllocator(self.alloc.num_blocks, self.block_size)
        self.tables.clear()
        self.hits = 0

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks (full ones stay cached for reuse)."""
        table = self.tables.pop(seq_id, None)
        for b in reversed(table.blocks if table else []):  # the prefix is released last: evicted last
            self.alloc.release(b)
