"""Where a request runs on elastic workers, its (prefill, decode) ranks, from a snapshot of every
rank and the SLOs (docs/architecture.md, Elastic workers). Pure: tests run it on traces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pd_local.engine.step_cost import StepCost

# Another rank prefills only below this share of the decode rank's own estimate (noise, transfer).
LOCAL_MARGIN = 0.8


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


@dataclass(frozen=True)
class Placement:
    prefill: int
    decode: int
    ttft_ms: float  # the chosen prefill rank's estimate; 0: costs not known yet
    reason: str


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
