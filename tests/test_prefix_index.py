"""The router's prefix index and the `prefix` routing rule (cluster/prefix_index.py), alone."""

from __future__ import annotations

import pytest

from pd_local.cluster.prefix_index import Candidate, PrefixIndex, choose
from pd_local.engine.kv_cache import block_hashes

BS = 4


def hashes(ids: list[int]) -> list[bytes]:
    return block_hashes(ids, BS)


SYS = list(range(100, 116))  # 4 full blocks


def test_match_counts_the_leading_blocks_held() -> None:
    idx = PrefixIndex(100)
    idx.insert(hashes(SYS + [1, 2, 3, 4, 5]))  # 5 full blocks, a partial one not indexed
    assert len(idx) == 5
    assert idx.match(hashes(SYS + [1, 2, 3, 4, 9, 9, 9, 9])) == 5
    assert idx.match(hashes(SYS + [1, 2, 3, 7])) == 4  # diverges in block 4
    assert idx.match(hashes([0] + SYS)) == 0  # same tokens, shifted: a different chain
    assert idx.match(hashes(SYS[:3])) == 0  # no full block
    assert idx.match([]) == 0


def test_a_block_found_after_a_miss_does_not_count() -> None:
    """A chain's later hash cannot be present without its head unless evicted out of order;
    even then, only the leading run is a usable prefix."""
    idx = PrefixIndex(100)
    h = hashes(SYS)
    idx.insert(h[2:])  # only blocks 2, 3
    assert idx.match(h) == 0


def test_the_bound_evicts_least_recent_prompts_tail_first() -> None:
    idx = PrefixIndex(6)
    a = hashes([1] * 16)  # 4 blocks
    b = hashes([2] * 16)  # 4 blocks
    idx.insert(a)
    idx.insert(b)  # 8 > 6: a's two tail blocks go, its head stays usable
    assert len(idx) == 6
    assert idx.match(b) == 4
    assert idx.match(a) == 2
    idx.insert(a)  # a is most recent again: now b loses its tail
    assert idx.match(a) == 4 and idx.match(b) == 2


def test_match_does_not_refresh_and_resize_evicts() -> None:
    idx = PrefixIndex(8)
    a, b = hashes([1] * 16), hashes([2] * 16)
    idx.insert(a)
    idx.insert(b)
    assert idx.match(a) == 4  # a read: a stays the least recent
    idx.resize(4)
    assert idx.match(a) == 0 and idx.match(b) == 4
    idx.resize(0)
    assert len(idx) == 0
    with pytest.raises(ValueError, match="capacity must be >= 0, got -1"):
        idx.resize(-1)


def test_choose_sends_to_the_longest_prefix() -> None:
    cands = [Candidate(1, load=0, matched=0), Candidate(2, load=2, matched=3),
             Candidate(3, load=1, matched=5)]
    assert choose(cands, margin=4) == (3, 5)


def test_choose_ties_and_no_hit_fall_back_to_load() -> None:
    tied = [Candidate(1, 3, 5), Candidate(2, 1, 5), Candidate(3, 0, 2)]
    assert choose(tied, margin=4) == (2, 5)  # equal prefixes: the less loaded
    none = [Candidate(1, 2, 0), Candidate(2, 1, 0, (-5,)), Candidate(3, 1, 0, (-9,))]
    assert choose(none, margin=4) == (3, 0)  # load, then the tie key (most free blocks)


def test_choose_load_overrides_the_prefix_beyond_the_margin() -> None:
    at = [Candidate(1, 0, 0), Candidate(2, 4, 7)]
    assert choose(at, margin=4) == (2, 7)  # exactly the margin: the prefix still wins
    over = [Candidate(1, 0, 0), Candidate(2, 5, 7)]
    assert choose(over, margin=4) == (1, 0)
    assert choose(over, margin=0) == (1, 0)


def test_choose_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no candidate ranks"):
        choose([], 1)
    with pytest.raises(ValueError, match="margin must be >= 0, got -1"):
        choose([Candidate(1, 0, 0)], -1)
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        PrefixIndex(-3)
