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
