"""Where a request runs, its (prefill, decode) ranks, from a snapshot of every rank: every topology
is rank views (a PD or colocated rank's are fixed by its role; an elastic rank's by its mode) and
one routing policy picks among them (docs/architecture.md, Placement). Pure: tests run it on
traces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pd_local.config import ROUTING_POLICIES
from pd_local.cluster.prefix_index import Candidate, choose
from pd_local.engine.step_cost import StepCost

# Another rank prefills only below this share of the decode rank's own estimate (noise, transfer).
LOCAL_MARGIN = 0.8
# "prefix": a decode step at batch 16 costs ~2x batch 1 on CPU (docs/design.md), so 4 more requests
# slow a rank ~10%, worth a hit that saves the prompt's prefill (colocated) or KV transfer.
PREFIX_DECODE_MARGIN = 4


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True)
class RankView:
    rank: int
    decodes: bool  # takes requests to decode
    prefills_own: bool  # prefills what it decodes
    prefills_for_others: bool
    queued_tokens: int  # prompt tokens routed to it to prefill, not yet done
    running: int  # its decode batch
    free_blocks: int
    cost: StepCost
    helps: bool = False  # prefills (its own or others') only when no other rank would in TTFT
    matched: int = 0  # "prefix" routing: the prompt's leading full blocks the rank holds


@dataclass(frozen=True)
class Placement:
    prefill: int
    decode: int
    ttft_ms: float  # the chosen prefill rank's estimate; 0: costs not known yet
    reason: str
    decode_matched: int = 0  # "prefix": blocks of the prompt each chosen rank holds
    prefill_matched: int = 0


def prefill_ms(r: RankView, tokens: int, slo: Slo, floor: int, cap: int) -> float:
    """r's estimated time to prefill its queue plus `tokens`, at its budget (the worker's)."""
    queued = r.queued_tokens + tokens
    budget = r.cost.prefill_budget(r.running, slo.tpot_ms, floor, cap, queued, slo.ttft_ms)
    return r.cost.prefill_ms(queued, r.running, budget)


def place(prompt_tokens: int, blocks: int, ranks: Sequence[RankView], slo: Slo, floor: int,
          cap: int) -> Placement:
    """Decode: the smallest batch (then the shortest step) among ranks with `blocks` free.
    Prefill: the earliest estimated end, the decode rank's own unless clearly beaten."""
    decoders = [r for r in ranks if r.decodes]
    if not decoders:
        raise ValueError("no rank decodes")
    fits = [r for r in decoders if r.free_blocks >= blocks] or decoders
    d = min(fits, key=lambda r: (r.running, r.cost.step_ms(r.running + 1, 0), -r.free_blocks, r.rank))
    others = [r for r in ranks if r.prefills_for_others and r.rank != d.rank]
    own = d.prefills_own
    cands = ([d] if own else []) + others
    est = {r.rank: prefill_ms(r, prompt_tokens, slo, floor, cap) for r in ranks if r.cost.known}
    helpers = [r for r in ranks if r.helps and r not in cands]
    if helpers and (not cands or min(est.get(r.rank, 0.0) for r in cands) > slo.ttft_ms):
        own = own or d in helpers  # the queue threatens TTFT: the mostly-decode ranks help
        others += [r for r in helpers if r is not d]
        cands += helpers
    known = all(r.rank in est for r in cands)
    if not cands:
        raise ValueError(f"no rank prefills for decode rank {d.rank}")
    if not known:
        p = min(cands, key=lambda r: (r.queued_tokens, r is not d, r.rank))
        return Placement(p.rank, d.rank, 0.0, f"costs unknown: least queued prefill ({p.queued_tokens} tokens)")
    best = min(others, key=lambda r: (est[r.rank], r.rank)) if others else d
    if own and not est[best.rank] < LOCAL_MARGIN * est[d.rank]:
        why = f" (rank {best.rank}: {est[best.rank]:.0f} ms)" if others else ""
        return Placement(d.rank, d.rank, est[d.rank], f"local: {est[d.rank]:.0f} ms{why}")
    local = f" (locally {est[d.rank]:.0f} ms)" if own else ""
    return Placement(best.rank, d.rank, est[best.rank], f"rank {best.rank} prefills: {est[best.rank]:.0f} ms{local}")


class Placer:
    """The router's one placement path, for every topology and routing policy: `load` is place()
    above; `round_robin` takes the decoding ranks in turn and, per decode rank, the ranks that may
    prefill for it in turn; `prefix` prefers the ranks holding the prompt's leading blocks within
    a load margin. Its only state is the round-robin turns."""

    def __init__(self, policy: str, slo: Slo, block_size: int, cap: int) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing must be one of {', '.join(ROUTING_POLICIES)}; got {policy!r}")
        self.policy, self.slo, self.block_size, self.cap = policy, slo, block_size, cap
        self._last_decode = -1
        self._last_prefill: dict[int, int] = {}  # decode rank -> the prefill rank it had last

    def place(self, prompt_tokens: int, blocks: int, ranks: Sequence[RankView]) -> Placement:
        if self.policy == "load":
            return place(prompt_tokens, blocks, ranks, self.slo, self.block_size, self.cap)
        decoders = [r for r in ranks if r.decodes]
        if not decoders:
            raise ValueError("no rank decodes")
        if self.policy == "round_robin":
            d = _next_after(decoders, self._last_decode)
            self._last_decode, dm = d.rank, 0
        else:
            rank, dm = choose([Candidate(r.rank, r.running, r.matched, (-r.free_blocks,))
                               for r in decoders], PREFIX_DECODE_MARGIN)
            d = next(r for r in decoders if r.rank == rank)
        others = [r for r in ranks if r.prefills_for_others and r.rank != d.rank]
        cands = ([d] if d.prefills_own else []) + others
        if not cands:  # only mostly-decode ranks left: they help
            cands = ([d] if d.helps else []) + [r for r in ranks if r.helps and r.rank != d.rank]
        if not cands:
            raise ValueError(f"no rank prefills for decode rank {d.rank}")
        if self.policy == "round_robin":
            p = _next_after(cands, self._last_prefill.get(d.rank, -1))
            self._last_prefill[d.rank] = p.rank
            return Placement(p.rank, d.rank, 0.0, "round robin", dm, 0)
        if d in cands and d.queued_tokens <= min(r.queued_tokens for r in cands):
            return Placement(d.rank, d.rank, 0.0, f"prefix: local ({dm} blocks held)", dm, dm)
        n, bs = prompt_tokens, self.block_size
        others = [r for r in cands if r is not d]
        rank, pm = choose([Candidate(r.rank, r.queued_tokens + n - r.matched * bs, r.matched,
                                     (r.queued_tokens,)) for r in others], 0)
        return Placement(rank, d.rank, 0.0, f"prefix: rank {rank} prefills ({pm} blocks held)", dm, pm)


def _next_after(ranks: Sequence[RankView], last: int) -> RankView:
    """Round robin over a set that may change: the first rank after `last`, else the first."""
    order = sorted(ranks, key=lambda r: r.rank)
    return next((r for r in order if r.rank > last), order[0])
