"""Which KV heads each (prefill TP rank, decode TP rank) pair moves between instances of
different TP sizes: their overlap (docs/architecture.md, Tensor parallel). Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSlice:
    prefill: int  # rank within the prefill instance
    decode: int  # rank within the decode instance
    heads: range  # the model's KV heads this pair moves
    src: range  # their indices among the prefill rank's heads
    dst: range  # among the decode rank's

    def num_bytes(self, tokens: int, head_dim: int, layers: int, elem_size: int) -> int:
        """K and V of these heads for `tokens` positions over every layer."""
        return 2 * len(self.heads) * tokens * head_dim * layers * elem_size


def owned(kv_heads: int, tp: int, rank: int) -> range:
    """The KV heads rank holds in an instance of tp ranks."""
    per = kv_heads // tp
    return range(rank * per, (rank + 1) * per)


def plan(kv_heads: int, prefill_tp: int, decode_tp: int) -> list[HeadSlice]:
    """Every pair that shares heads, with what it moves; ValueError (the numbers) unless both
    sizes split the KV heads."""
    for name, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        if tp < 1 or kv_heads % tp:
            raise ValueError(f"{name} tensor parallel {tp}: the model's {kv_heads} KV heads do not "
                             f"split over {tp} ranks")
    out = []
    for p in range(prefill_tp):
        mine = owned(kv_heads, prefill_tp, p)
        for d in range(decode_tp):
            theirs = owned(kv_heads, decode_tp, d)
            lo, hi = max(mine.start, theirs.start), min(mine.stop, theirs.stop)
            if lo < hi:
                out.append(HeadSlice(p, d, range(lo, hi), range(lo - mine.start, hi - mine.start),
                                     range(lo - theirs.start, hi - theirs.start)))
    return out
