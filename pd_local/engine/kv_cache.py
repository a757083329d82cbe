"""Paged KV cache bookkeeping: a pure-Python block allocator and the slot arithmetic.

The tensors the block ids index (`PagedKVCache`) live in `pd_local.model.kv_cache`, next to the
attention that reads and writes them.

Ownership contract: every block id handed out by `BlockAllocator.allocate` is returned by exactly
one `free` call. A double free or a free of a block never handed out raises at once (it is a bug
that would otherwise corrupt another request's KV silently). No torch in here.
"""

from __future__ import annotations

import hashlib
import logging
import struct

log = logging.getLogger(__name__)


class OutOfBlocks(RuntimeError):
    """Not enough free blocks; the caller queues, preempts or rejects."""


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1; lowest ids first on a fresh allocator."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_total = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives 0 first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} of {self.num_total} free")
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise ValueError(f"block {i} freed but not allocated (double free?)")
            self._used.remove(i)
            self._free.append(i)


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
