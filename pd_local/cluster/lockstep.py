"""One plan for a TP instance's ranks: the leader shares each turn's messages before anyone acts on
them, so every rank steps alike and the all-reduces pair up (docs/architecture.md, Tensor parallel)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch.distributed as dist

from pd_local.cluster.messages import Reserve


@dataclass(frozen=True)
class Landed:
    """A TP decode leader's word, in its turn's order: every rank adds this prompt (its KV landed)."""

    req_id: int


class Diverged(RuntimeError):
    """A follower's engine no longer matches its leader's: stop rather than hang in an all-reduce."""


def seeded(msg: object) -> object:
    """A sampled request without a seed gets one here, so every rank draws the same tokens."""
    if isinstance(msg, Reserve) and msg.sampling.seed is None and not msg.sampling.greedy:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
        return dataclasses.replace(msg, sampling=dataclasses.replace(msg.sampling, seed=seed))
    return msg


class Lockstep:
    """`share` once a turn on every rank of `ranks` (leader first), over `group` (gloo); an idle
    leader's turn ends within `idle_s`, under the group timeout."""

    def __init__(self, ranks: tuple[int, ...], rank: int, group: dist.ProcessGroup, idle_s: float) -> None:
        self.ranks, self.group, self.idle_s = ranks, group, idle_s
        self.is_leader = rank == ranks[0]
        self.digest = (0, 0)  # (tokens this rank's engine produced so far, their hash): the leader's

    def record(self, req_id: int, token_id: int) -> None:
        n, h = self.digest
        self.digest = (n + 1, (h * 1_000_003 + req_id * 131 + token_id) % (1 << 61))

    def agree(self, what: str, value: object) -> None:
        """Diverged, with every rank's value, unless all ranks of the instance hold the same."""
        values: list[object] = [None] * len(self.ranks)
        dist.all_gather_object(values, value, group=self.group)
        if any(v != values[0] for v in values):
            raise Diverged(f"TP instance {list(self.ranks)}: its ranks' {what} differ: {values} "
                           "(set engine.kv_cache_gb so every rank sizes its cache alike)")

    def share(self, msgs: list[object]) -> list[object]:
        """The leader's messages of this turn (seeded), on every rank; Diverged if a follower's
        tokens differ."""
        box: list[object] = [([seeded(m) for m in msgs], self.digest)] if self.is_leader else [None]
        dist.broadcast_object_list(box, src=self.ranks[0], group=self.group)
        shared, digest = box[0]  # type: ignore[misc]
        if digest != self.digest:
            raise Diverged(f"TP rank of instance {list(self.ranks)}: its tokens differ from its leader's "
                           f"({self.digest[0]} vs {digest[0]} so far: a sampling or kernel difference)")
        return shared
