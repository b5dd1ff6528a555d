"""The paged-KV block allocator and block tables: refcounts, prefix reuse, LRU eviction, admission."""

from __future__ import annotations

import pytest

from engine.serving.blocks import BlockAllocator, BlockManager, chain_hash


def test_allocate_release_refcounts():
    a = BlockAllocator(3, 4)
    blocks = [a.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and a.available == 0 and a.in_use == 3
    with pytest.raises(RuntimeError, match="no free KV block"):
        a.allocate()
    a.release(blocks[1])
    assert a.available == 1 and a.allocate() == blocks[1]
    with pytest.raises(AssertionError):
        a.release(blocks[0]) or a.release(blocks[0])


def test_hashed_blocks_are_cached_and_evicted_lru():
    a = BlockAllocator(3, 2)
    b0, b1, b2 = a.allocate(), a.allocate(), a.allocate()
    h0 = a.register(b0, None, (1, 2))
    a.register(b1, h0, (3, 4))
    a.register(b2, None, (9, 9))
    for b in (b2, b0, b1):  # b2 released first: least recently used
        a.release(b)
    assert a.available == 3 and a.lookup(None, (1, 2)) == b0 and a.lookup(h0, (3, 4)) == b1
    a.acquire(b0)  # a hit takes the block off the LRU list
    assert a.refs[b0] == 1 and a.available == 2
    assert a.allocate() == b2 and a.lookup(None, (9, 9)) is None  # evicted: no longer found
    assert a.allocate() == b1 and a.lookup(h0, (3, 4)) is None
    assert a.lookup(None, (1, 2)) == b0  # in use: never evicted


def test_lookup_checks_tokens_not_only_the_hash():
    a = BlockAllocator(2, 2)
    b = a.allocate()
    h = a.register(b, None, (5, 6))
    a.by_hash[chain_hash(None, (7, 8))] = b  # simulate a collision
    assert a.lookup(None, (7, 8)) is None and a.lookup(None, (5, 6)) == b and h == chain_hash(None, (5, 6))


def test_same_hash_registered_twice_keeps_the_first():
    a = BlockAllocator(2, 2)
    b0, b1 = a.allocate(), a.allocate()
    assert a.register(b0, None, (1, 1)) == a.register(b1, None, (1, 1))
    a.release(b1)
    assert list(a.free) == [b1] and a.lookup(None, (1, 1)) == b0  # the duplicate is plain free space


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_prefix_reuse_across_sequences(block_size):
    m = BlockManager(32, block_size)
    system = list(range(100, 112))  # 12 shared tokens
    first = system + [1, 2, 3]
    assert m.admit(1, first, len(first) + 4) == 0
    m.reserve(1, len(first))
    m.computed(1, first, len(first))
    m.free(1)
    second = system + [7, 8]
    hit = m.admit(2, second, len(second) + 4)
    assert hit == min(12 // block_size, (len(second) - 1) // block_size) * block_size  # full shared blocks
    assert m.tables[2].blocks[: hit // block_size] == [m.alloc.lookup(*_chain(system, block_size, i))
                                                        for i in range(hit // block_size)]
    again = m.admit(3, first, len(first) + 4)  # the whole first prompt but its last token
    assert again == (len(first) - 1) // block_size * block_size
    shared = m.tables[3].blocks[0]
    assert m.alloc.refs[shared] == 2 and m.hits == hit + again


def _chain(tokens, bs, i):
    prev = None
    for j in range(i):
        prev = chain_hash(prev, tuple(tokens[j * bs:(j + 1) * bs]))
    return prev, tuple(tokens[i * bs:(i + 1) * bs])


def test_admission_reserves_the_worst_case_and_never_overcommits():
    m = BlockManager(8, 4)
    assert m.can_admit([1] * 10, 20)  # 5 blocks
    m.admit(1, [1] * 10, 20)
    m.reserve(1, 10)  # 3 allocated, 2 still reserved
    assert m.alloc.available == 5
    assert m.can_admit([2] * 4, 12) and not m.can_admit([2] * 4, 13)  # 3 fit beside the 2 reserved, 4 do not
    m.admit(2, [2] * 4, 12)
    m.reserve(1, 20)
    m.reserve(2, 12)
    assert m.alloc.available == 0
    with pytest.raises(AssertionError, match="outgrew"):
        m.reserve(2, 13)
    m.free(1)
    m.free(2)
    assert m.alloc.available == 8 and not m.tables


def test_admission_counts_unused_cached_hits_as_taken():
    m = BlockManager(4, 2)
    p = [1, 2, 3, 4, 5]
    m.admit(1, p, 6)
    m.reserve(1, 6)
    m.computed(1, p + [6], 6)
    m.free(1)  # 3 hashed blocks cached, refcount 0
    assert m.alloc.available == 4
    assert m.can_admit(p, 8)  # 2 hits (taken from the pool) + 2 fresh = 4
    assert not m.can_admit(p, 9)


def test_a_block_is_found_only_after_the_prefix_it_was_computed_after():
    """The chain digest stands for the whole prefix: the same block tokens after another prefix are another block.
    With Python's hash of (previous hash, tokens) two previous values M = 2**61 - 1 apart met at the next block, so a
    prefix crafted to hash that way was handed keys and values computed after another client's prefix."""
    a = BlockAllocator(4, 2)
    first, other = chain_hash(None, (11, 12)), chain_hash(None, (13, 14))
    assert isinstance(first, bytes) and len(first) == 32 and first != other
    b = a.allocate()
    a.register(b, first, (5, 6))
    assert a.lookup(first, (5, 6)) == b and a.lookup(other, (5, 6)) is None
    old = hash((0, (5, 6))) == hash((2**61 - 1, (5, 6)))  # what the old chain reduced to
    assert old and chain_hash(b"\x00" * 32, (5, 6)) != chain_hash(b"\x01" * 32, (5, 6))
