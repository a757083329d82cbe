"""Block allocator: exact accounting under any sequence of operations."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_local.engine.kv_cache import BlockAllocator, OutOfBlocks, blocks_for, slots_for


def test_fresh_allocator_hands_out_lowest_ids_first() -> None:
    a = BlockAllocator(8)
    assert a.allocate(3) == [0, 1, 2]
    assert a.num_free == 5


def test_out_of_blocks_names_the_numbers_and_holds_nothing() -> None:
    a = BlockAllocator(4)
    a.allocate(3)
    with pytest.raises(OutOfBlocks, match="need 2 blocks, 1 of 4 free"):
        a.allocate(2)
    assert a.num_free == 1


def test_double_free_and_foreign_free_raise() -> None:
    a = BlockAllocator(4)
    ids = a.allocate(2)
    a.free(ids)
    with pytest.raises(ValueError, match="double free"):
        a.free(ids[:1])
    with pytest.raises(ValueError, match="block 3 freed but not allocated"):
        a.free([3])
    assert a.num_free == 4


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks must be > 0"):
        BlockAllocator(0)
    with pytest.raises(ValueError, match="cannot allocate -1"):
        BlockAllocator(2).allocate(-1)


def test_slots_follow_the_block_table() -> None:
    assert blocks_for(0, 4) == 0 and blocks_for(4, 4) == 1 and blocks_for(5, 4) == 2
    assert slots_for([7, 2], 2, 7, 4) == [30, 31, 8, 9, 10]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "grow"]), st.integers(0, 6)), max_size=60))
def test_allocator_never_leaks(ops: list[tuple[str, int]]) -> None:
    a = BlockAllocator(16)
    owners: list[list[int]] = []
    for op, n in ops:
        if op == "alloc":
            if a.can_allocate(n):
                owners.append(a.allocate(n))
            else:
                with pytest.raises(OutOfBlocks):
                    a.allocate(n)
        elif op == "grow" and owners and a.can_allocate(1):
            owners[n % len(owners)] += a.allocate(1)
        elif op == "free" and owners:
            a.free(owners.pop(n % len(owners)))
        held = [b for o in owners for b in o]
        assert len(held) == len(set(held)), "a block handed to two owners"
        assert a.num_free + len(held) == a.num_total
    for o in owners:
        a.free(o)
    assert a.num_free == a.num_total


def test_block_hashes_chain_names_the_whole_prefix() -> None:
    from pd_local.engine.kv_cache import block_hashes

    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # the partial third block has no hash
    b = block_hashes([99] + list(range(1, 40)), 16)
    assert a[0] != b[0] and a[1] != b[1]  # block 1's tokens are equal, its prefix is not
    c = block_hashes(list(range(32)) + [7] * 16, 16)
    assert c[:2] == a[:2] and len(c) == 3
    assert block_hashes(list(range(16)), 16, salt=b"bf16") != block_hashes(list(range(16)), 16)
    with pytest.raises(struct.error):
        block_hashes([2**70] * 16, 16)  # not an int64 token id


# -- prefix cache: reference counts, cached-unreferenced blocks, LRU eviction --------------------


def test_a_freed_registered_block_is_cached_and_taken_again() -> None:
    a = BlockAllocator(4, caching=True)
    ids = a.allocate(3)
    assert a.register(ids[0], b"h0") and a.register(ids[1], b"h1")
    a.free(ids)
    assert (a.num_free, a.num_cached, a.num_held) == (4, 2, 0)
    assert a.num_cached_prefix([b"h0", b"h1", b"h2"]) == 2
    got = a.take_cached([b"h0", b"h1", b"h2"])
    assert got == ids[:2] and (a.num_cached, a.num_held) == (0, 2)
    again = a.take_cached([b"h0"])  # a second holder of a held block
    assert again == [ids[0]] and a.num_held == 2
    a.free(again)
    a.free(got)
    assert (a.num_free, a.num_cached) == (4, 2)
    a.check()


def test_allocate_takes_empty_blocks_first_then_evicts_least_recently_freed() -> None:
    a = BlockAllocator(4, caching=True)
    x, y = a.allocate(1), a.allocate(1)
    a.register(x[0], b"x")
    a.register(y[0], b"y")
    a.free(x)
    a.free(y)  # y freed after x: x goes first
    a.allocate(2)  # the two empty blocks; nothing evicted
    assert a.num_cached_prefix([b"x"]) == 1 and a.num_evicted == 0
    a.allocate(1)
    assert a.num_cached_prefix([b"x"]) == 0 and a.num_cached_prefix([b"y"]) == 1
    assert a.num_evicted == 1
    a.check()


def test_a_sequence_tail_is_evicted_before_its_head() -> None:
    a = BlockAllocator(3, caching=True)
    ids = a.allocate(3)
    for i, h in zip(ids, (b"a", b"b", b"c")):
        a.register(i, h)
    a.free(ids)
    a.allocate(1)
    assert a.num_cached_prefix([b"a", b"b", b"c"]) == 2  # c (the tail) went first


def test_held_blocks_are_never_evicted_and_out_of_blocks_counts_cached_as_free() -> None:
    a = BlockAllocator(2, caching=True)
    held = a.allocate(1)
    a.register(held[0], b"keep")
    with pytest.raises(OutOfBlocks, match="need 2 blocks, 1 of 2 free"):
        a.allocate(2)
    other = a.allocate(1)
    assert other != held and a.num_cached_prefix([b"keep"]) == 1


def test_register_rules() -> None:
    a = BlockAllocator(3, caching=True)
    x, y = a.allocate(2)
    assert a.register(x, b"h")
    assert not a.register(y, b"h")  # same content twice: the first copy stays the cached one
    with pytest.raises(ValueError, match="already registered"):
        a.register(x, b"other")
    with pytest.raises(ValueError, match="registered but not held"):
        a.register(2, b"z")
    off = BlockAllocator(2)
    b = off.allocate(1)
    assert not off.register(b[0], b"h")  # caching off: nothing is ever kept
    off.free(b)
    assert off.num_cached == 0 and off.take_cached([b"h"]) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "take", "free", "register"]),
                          st.integers(0, 5), st.integers(0, 7)), max_size=80))
def test_prefix_cache_states_add_up_after_every_operation(ops: list[tuple[str, int, int]]) -> None:
    """Random sequences of the engine's operations: free + cached + held == total at every step,
    no block is written by two owners unless both took it as cached content, and a taken block
    always carries the content it was registered with."""
    a = BlockAllocator(12, caching=True)
    owners: list[list[int]] = []
    content: dict[int, bytes] = {}  # what a registered block holds (the test's model of the KV)
    for op, n, h in ops:
        key = bytes([h])
        if op == "alloc":
            if a.can_allocate(n):
                ids = a.allocate(n)
                for i in ids:
                    content.pop(i, None)  # new content: the old one is gone
                owners.append(ids)
            else:
                with pytest.raises(OutOfBlocks):
                    a.allocate(n)
        elif op == "take":
            chain = [bytes([k]) for k in range(h, h + n)]
            ids = a.take_cached(chain)
            assert [content[i] for i in ids] == chain[:len(ids)]
            owners.append(ids)
        elif op == "register" and owners:
            o = owners[n % len(owners)]
            if o and o[0] not in content and a.register(o[0], key):
                content[o[0]] = key
        elif op == "free" and owners:
            a.free(owners.pop(n % len(owners)))
        a.check()
        held = {b for o in owners for b in o}
        assert a.num_held == len(held)
        assert a.num_free + a.num_held == a.num_total  # free counts empty + cached
    for o in owners:
        a.free(o)
    a.check()
    assert a.num_free == a.num_total and a.num_held == 0


def test_hold_takes_the_cached_prefix_first_and_holds_nothing_when_it_does_not_fit() -> None:
    a = BlockAllocator(6, caching=True)
    first = a.allocate(2)
    a.register(first[0], b"p0")
    a.register(first[1], b"p1")
    a.free(first)
    got = a.hold([b"p0", b"p1", b"p2"], 4)
    assert got is not None and got[0][:2] == first and got[1] == 2 and a.num_held == 4
    assert a.hold([b"p0"], 4) is None  # p0 (held already) + 3 new > 2 free
    assert a.num_held == 4 and a.num_free == 2  # the refused call took nothing
    a.free([got[0][0]])  # the reference the refused call must not have left behind
    assert a.num_held == 3 and a.num_free == 3
    a.take_cached([b"p0"])
    a.free(got[0])
    assert a.hold([], 6, keep_free=1) is None and a.num_held == 0
    a.check()
