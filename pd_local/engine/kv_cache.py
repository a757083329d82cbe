"""Paged KV bookkeeping, no torch: a block allocator where every reference handed out is freed
exactly once (a double free raises), an optional prefix cache (freed registered blocks stay
cached until `allocate` needs them, oldest first), and the slot arithmetic."""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import OrderedDict

log = logging.getLogger(__name__)


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the caller queues, preempts or rejects."""


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1; lowest ids first on a fresh allocator."""

    def __init__(self, num_blocks: int, caching: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_total = num_blocks
        self.caching = caching
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives 0 first
        self._cached: OrderedDict[int, None] = OrderedDict()  # free with content; oldest first
        self._refs: dict[int, int] = {}  # held block -> number of holders
        self._hash_of: dict[int, bytes] = {}  # cached or held block -> its content id
        self._block_of: dict[bytes, int] = {}
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        """Blocks nobody holds: empty or cached (both can be allocated)."""
        return len(self._empty) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Free blocks whose content is kept for a later prefix hit."""
        return len(self._cached)

    @property
    def num_held(self) -> int:
        return len(self._refs)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n blocks for new content, each held once: empty ones first, then the least recently
        freed cached ones (their content is forgotten)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} of {self.num_total} free")
        ids = []
        for _ in range(n):
            if self._empty:
                i = self._empty.pop()
            else:
                i, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(i)]
                self.num_evicted += 1
            self._refs[i] = 1
            ids.append(i)
        return ids

    def free(self, ids: list[int]) -> None:
        """Drop one reference to each block. A block nobody holds any more becomes empty, or
        cached if it has a hash; a sequence's later blocks are evicted before its earlier ones
        (they are only useful after them)."""
        newly_cached = []
        for i in ids:
            refs = self._refs.get(i)
            if refs is None:
                raise ValueError(f"block {i} freed but not allocated (double free?)")
            if refs > 1:
                self._refs[i] = refs - 1
                continue
            del self._refs[i]
            if i in self._hash_of:
                newly_cached.append(i)
            else:
                self._empty.append(i)
        for i in reversed(newly_cached):
            self._cached[i] = None

    def share(self, ids: list[int]) -> None:
        """One more reference to each held block (a forked sequence shares its parent's)."""
        for i in ids:
            if i not in self._refs:
                raise ValueError(f"block {i} shared but not held")
            self._refs[i] += 1

    # -- prefix cache ------------------------------------------------------------------------

    def register(self, block: int, block_hash: bytes) -> bool:
        """Name a held block's (final) content. False, and nothing changes, when caching is off
        or another block already holds that content (the first one stays the cached copy)."""
        if block not in self._refs:
            raise ValueError(f"block {block} registered but not held")
        if not self.caching or block_hash in self._block_of:
            return False
        old = self._hash_of.get(block)
        if old is not None:
            raise ValueError(f"block {block} is already registered with other content")
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def num_cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading blocks of `hashes` have cached or held copies (nothing is taken)."""
        n = 0
        for h in hashes:
            if h not in self._block_of:
                break
            n += 1
        return n

    def take_cached(self, hashes: list[bytes]) -> list[int]:
        """Hold (one more reference each) the blocks of the longest cached prefix of `hashes`;
        the caller frees them like allocated ones."""
        ids = [self._block_of[h] for h in hashes[:self.num_cached_prefix(hashes)]]
        for i in ids:
            if i in self._cached:
                del self._cached[i]
                self._refs[i] = 1
            else:
                self._refs[i] += 1
        return ids

    def hold(self, hashes: list[bytes], num_blocks: int, keep_free: int = 0) -> tuple[list[int], int] | None:
        """A request's `num_blocks` blocks: the longest cached prefix of `hashes` first, then new
        ones, leaving at least `keep_free` free; (ids, how many came from the cache), or None
        with nothing held when they do not fit."""
        cached = self.take_cached(hashes)
        need = num_blocks - len(cached)
        if not self.can_allocate(need + keep_free):
            self.free(cached)
            return None
        return cached + self.allocate(need), len(cached)

    def check(self) -> None:
        """Assert the state invariant (tests and debugging): every block in exactly one state."""
        empty, cached, held = set(self._empty), set(self._cached), set(self._refs)
        assert len(empty) == len(self._empty), "a block is twice in the empty stack"
        assert not (empty & cached or empty & held or cached & held), "a block in two states"
        assert len(empty) + len(cached) + len(held) == self.num_total, "a block in no state"
        assert all(r >= 1 for r in self._refs.values())
        assert set(self._hash_of) <= cached | held and cached <= set(self._hash_of)
        assert all(self._block_of[h] == b for b, h in self._hash_of.items())
        assert len(self._block_of) == len(self._hash_of)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return (num_tokens + block_size - 1) // block_size


def slots_for(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions [start, end) of a sequence with block table block_ids."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def block_hashes(token_ids: list[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """The prefix-cache identity of every full block of `token_ids`: a hash chain, so block i's
    hash names the tokens of blocks 0..i (the same tokens in another context hash differently).
    `salt` stands for whatever else changes KV (model, dtype). Deterministic across processes
    (the router and every rank compute the same ids without talking). A trailing partial block
    has no hash: only full blocks are ever shared."""
    out: list[bytes] = []
    h = hashlib.blake2b(salt, digest_size=16).digest()
    for i in range(len(token_ids) // block_size):
        block = token_ids[i * block_size:(i + 1) * block_size]
        h = hashlib.blake2b(h + struct.pack(f"<{block_size}q", *block), digest_size=16).digest()
        out.append(h)
    return out
