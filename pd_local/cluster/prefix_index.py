"""The router's guess of which full prompt blocks each worker holds (an LRU per rank, tail
evicted first; docs/architecture.md, Routing), and the `prefix` routing rule on it. No torch."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class PrefixIndex:
    """An LRU set of block hashes for one rank, at most `capacity` (its block count; 0: nothing)."""

    def __init__(self, capacity: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"PrefixIndex capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, h: bytes) -> bool:
        return h in self._lru

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of `hashes` (a prompt's chain) this rank holds. Read-only:
        routing a request elsewhere must not refresh this rank's entries."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[bytes]) -> None:
        """Record that the rank now holds `hashes` (a prompt it was sent): each becomes most
        recently used, the head more recent than the tail; then evict the least recent entries
        beyond `capacity`."""
        for h in reversed(hashes):
            self._lru[h] = None
            self._lru.move_to_end(h)
        self._evict()

    def resize(self, capacity: int) -> None:
        """Set the bound (when the rank reports its block count) and evict down to it."""
        if capacity < 0:
            raise ValueError(f"PrefixIndex capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._evict()

    def _evict(self) -> None:
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)


@dataclass(frozen=True)
class Candidate:
    """One rank for the `prefix` rule: its load, `tie` (lower first), blocks `matched`."""

    rank: int
    load: int
    matched: int
    tie: tuple[int, ...] = ()


def choose(candidates: Sequence[Candidate], margin: int) -> tuple[int, int]:
    """The `prefix` rule -> (rank, matched blocks there): the least loaded of the ranks with the
    most matched blocks, unless its load exceeds the least-loaded rank's by more than `margin`
    (then that one, as with no match at all). Load ties: (load, tie, rank)."""
    if not candidates:
        raise ValueError("choose: no candidate ranks")
    if margin < 0:
        raise ValueError(f"choose: margin must be >= 0, got {margin}")

    def key(c: Candidate) -> tuple[object, ...]:
        return (c.load, c.tie, c.rank)

    least = min(candidates, key=key)
    top = max(c.matched for c in candidates)
    if top == 0:
        return least.rank, least.matched
    best = min((c for c in candidates if c.matched == top), key=key)
    if best.load - least.load > margin:
        return least.rank, least.matched
    return best.rank, best.matched
