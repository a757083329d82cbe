"""The router's side of elastic workers beyond placement (docs/architecture.md, Elastic workers):
their modes (modes.py's policy on the measured work mix), and live migration: when to move which
running request, and the steps of one move: MigrateOut -> Paused -> Reserve(output_ids) on the
destination -> Reserved -> SendKV -> Migrated (or Rejected -> Stay)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from pd_local.api.backend import FLIP_BUCKETS, Observed
from pd_local.cluster.messages import MigrateOut, Migrated, Paused, Reserve, Stay
from pd_local.cluster.modes import Flip, Mode, ModePolicy, Rate
from pd_local.engine.events import Load
from pd_local.cluster.router_state import RequestState

if TYPE_CHECKING:
    from pd_local.cluster.router import Router

log = logging.getLogger(__name__)

# A running request moves when decode batches differ by this much (one move narrows it; a gap of
# 1 would only swap the sides), one at a time, with a pause after each (the ranks' reported
# batches lag), and only if this many tokens are left to decode.
MIGRATE_GAP, MIGRATE_PAUSE_S, MIGRATE_MIN_LEFT = 2, 1.0, 16


class Mover:
    """One move at a time; `moving_req` is it. Runs on the router thread."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.moving_req: int | None = None
        self.dst, self.move_start = 0, 0.0  # where it goes, since when
        self.last_end = 0.0
        m = router.ctx.cfg.modes
        self.policy = ModePolicy({r: Mode.MIXED for r in router.decode}, dwell_s=m.dwell_s, confirm_s=m.confirm_s)
        self.busy = (Rate(m.rate_tau_s), Rate(m.rate_tau_s))  # ms/s the ranks spend on prompt tokens, on decode rows
        self.busy_seen: dict[int, tuple[float, float]] = {}
        self.vacating: dict[int, float] = {}  # flipped to prefill at -> until its last decode left
        for r in router.decode.values() if router.elastic else ():
            r.mode = Mode.MIXED.value
        router.kv.mode_control = "policy" if router.elastic else ""

    def observe(self, rank: int, load: Load, now: float) -> None:
        """A rank's load report: its busy time since the last one joins the work measured."""
        was = self.busy_seen.get(rank, (0.0, 0.0))
        self.busy_seen[rank] = (load.prefill_busy_ms, load.decode_busy_ms)
        for rate, a, b in zip(self.busy, was, self.busy_seen[rank]):
            rate.add(now, b - a)

    def flip(self, now: float) -> None:
        """Ask the mode policy, on the work measured (busy ranks of prefill and of decode)."""
        r = self.router
        if self.busy[0].age(now) < self.busy[0].tau_s:  # measure a while first
            return
        prefill, decode = (rate.at(now) / 1000 for rate in self.busy)
        r.kv.demand = {"prefill": prefill, "decode": decode}
        for f in self.policy.decide(now, prefill, decode, {x.rank: x.load.running for x in r.decode.values()}):
            self._apply(f, now)

    def _apply(self, f: Flip, now: float) -> None:
        r = self.router
        log.info("rank %d -> %s: %s", f.rank, f.to.value, f.reason)
        r.ranks[f.rank].mode = f.to.value
        r.kv.flips[f.to.value] = r.kv.flips.get(f.to.value, 0) + 1
        if f.to is Mode.PREFILL:
            self.vacating[f.rank] = now
            self.vacated(now)  # nothing there: done at once
        else:
            self.vacating.pop(f.rank, None)
            self.flip_took(f.to, 0.0)  # takes effect with the next request

    def flip_took(self, to: Mode, seconds: float) -> None:
        self.router.kv.flip_seconds.setdefault(to.value, Observed(FLIP_BUCKETS)).add(seconds)

    def check_pin(self, rank: int, mode: str) -> Mode | None:
        """POST /v1/cluster/mode's arguments, checked (ValueError names the problem)."""
        if not self.router.elastic:
            raise ValueError(f"modes belong to elastic workers (serve --elastic N); this server is "
                             f"{self.router.ctx.cfg.topology.label}")
        if mode == "auto":
            return None
        if mode not in set(Mode):
            raise ValueError(f"mode must be one of {', '.join(Mode)} or auto, not {mode!r}")
        return Mode(mode)  # the rank and what the mode leaves: ModePolicy.pin checks them

    def pin(self, rank: int, mode: str, done: Future[None]) -> None:
        """The operator's mode ("auto": back to the policy), on the router thread, in order with
        other changes: `done` fails with the ValueError of a refusal, else the flip is applied."""
        now = time.monotonic()
        try:
            to = self.check_pin(rank, mode)
            f = self.policy.pin(now, rank, to)
        except ValueError as e:
            done.set_exception(e)
            return
        self.router.kv.mode_control = "operator" if to is not None else "policy"
        if to is None:
            log.info("modes: the policy decides again")
        elif f is not None:
            self._apply(f, now)
        done.set_result(None)

    def rebalance(self) -> None:
        """Flip modes, then move a running request: off a mostly-prefill rank first, else from
        the biggest decode batch to the smallest when they differ by MIGRATE_GAP; the request
        with the most tokens left (of those worth moving)."""
        r, now = self.router, time.monotonic()
        self.flip(now)
        self.vacated(now)
        emptying = [x for x in r.decode.values() if x.rank in self.vacating and x.unfinished]
        if self.moving_req is not None or (not emptying and now - self.last_end < MIGRATE_PAUSE_S):
            return  # emptying a rank knows where its requests are: no pause for lagging reports
        takers = [x for x in r.decode.values() if self.policy.modes[x.rank] is not Mode.PREFILL]
        idle = min(takers, key=lambda x: (x.load.running, x.rank))
        busy = emptying[0] if emptying else max(takers, key=lambda x: (x.load.running, -x.rank))
        if not emptying and busy.load.running - idle.load.running < MIGRATE_GAP:
            return
        movable = [q for q in r.requests.values() if q.decode == busy.rank and not q.first_token
                   and not q.awaits_prompt_lps and q.migrating_from is None
                   and (emptying or "migrate_start" not in q.timeline.t)  # balancing: once (no ping-pong)
                   and q.sampling.max_tokens - q.generated >= MIGRATE_MIN_LEFT]
        if not movable:
            return
        req = max(movable, key=lambda q: (q.sampling.max_tokens - q.generated, -len(q.prompt_ids)))
        log.info("migrating request %d: rank %d -> %d (decode batches %d vs %d)", req.req_id,
                 busy.rank, idle.rank, busy.load.running, idle.load.running)
        self.moving_req, self.dst, self.move_start = req.req_id, idle.rank, now
        req.timeline.mark("migrate_start")
        r.to_worker[busy.rank].send(MigrateOut(req.req_id, idle.rank))

    def vacated(self, now: float) -> None:
        """A flip to prefill is done once nothing decodes on the rank nor moves from it."""
        r = self.router
        for rank, t in list(self.vacating.items()):
            if r.decode[rank].unfinished == 0 and not any(q.migrating_from == rank for q in r.requests.values()):
                del self.vacating[rank]
                self.flip_took(Mode.PREFILL, now - t)

    def moving(self, req_id: int) -> bool:
        req = self.router.requests.get(req_id)
        return req is not None and req.migrating_from is not None

    def ended(self, req_id: int) -> None:
        if self.moving_req == req_id:
            self.moving_req = None
        if self.vacating:
            self.vacated(time.monotonic())

    def paused(self, msg: Paused) -> None:
        """The old rank stopped the request: the destination reserves it (its KV follows)."""
        r = self.router
        req = r.requests.get(msg.req_id)
        if req is None or self.moving_req != msg.req_id or not msg.output_ids:
            self.ended(msg.req_id)  # ended meanwhile, or it could not move (not decoding there)
            return
        src, dst = req.decode, self.dst
        r.decode[src].unfinished -= 1
        r.decode[dst].unfinished += 1
        req.decode, req.migrating_from = dst, src
        r.to_worker[dst].send(Reserve(req.req_id, req.prompt_ids, req.sampling, (), False,
                                      msg.output_ids, msg.rng_state))

    def stay(self, req: RequestState) -> None:
        """The destination refused: the request decodes on where it was."""
        r, src = self.router, req.migrating_from
        assert src is not None
        r.decode[req.decode].unfinished -= 1
        r.decode[src].unfinished += 1
        req.decode, req.migrating_from = src, None
        self.ended(req.req_id)
        r.to_worker[src].send(Stay(req.req_id))

    def migrated(self, msg: Migrated) -> None:
        r = self.router
        self.last_end = time.monotonic()
        r.kv.migrations += 1
        r.kv.migration_bytes += msg.num_bytes
        r.kv.migration_seconds.add(max(0.0, msg.t_end - self.move_start))
        req = r.requests.get(msg.req_id)
        if req is not None:
            req.migrating_from = None
            req.timeline.mark("migrated", msg.t_end)
        self.ended(msg.req_id)  # after migrating_from is cleared: a flip it held up may be done
