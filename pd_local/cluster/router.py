"""Rank 0's router (a `Backend`; served by frontend.py). One thread owns all routing state and
alone sends to workers; commands and worker messages reach it through one Inbox. A request:
Reserve -> Reserved -> Prefill -> PrefillDone while Tokens stream (prefilled where it decodes:
Reserve(local) -> PrefillDone -> Tokens).
A link failure or a Fatal fails every request and the server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from pd_local.api.backend import BackendStats, RequestOutput
from pd_local.cluster.dist import DistContext
from pd_local.cluster.channel import Heartbeater, Inbox, LinkDown, Receiver, Sender
from pd_local.cluster.messages import (Abort, Fatal, Migrated, Paused, Prefill, PrefillDone,
                                       PromptLogprobs, Ready, Rejected, Reserve,
                                       Reserved, SendKV, Shutdown, Stats, StopAsked, TokenEntry, Tokens)
from pd_local.cluster.migration import Mover
from pd_local.cluster.modes import Mode
from pd_local.cluster.placement import Placer, RankView, Slo
from pd_local.cluster.router_state import RankState, RequestState, with_token
from pd_local.engine.kv_cache import block_hashes, blocks_for
from pd_local.engine.events import Load
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import FinishReason

log = logging.getLogger(__name__)

DONE = (FinishReason.STOP, FinishReason.LENGTH)  # ended on its rank, not by the router
LOCAL = -1  # the inbox "peer" of commands from the asyncio loop


class Router:
    """The `Backend` over the workers (torchrun ranks, or cluster/local.py's one process)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        links, topo = ctx.links, ctx.topology
        self.colocated, self.elastic = topo.colocated, topo.elastic
        self.policy = ctx.cfg.routing
        slo = ctx.cfg.slo  # no TPOT budget: placement estimates prompts at full chunks
        self.slo = Slo(slo.ttft_ms, slo.tpot_ms if slo.tpot_budget else math.inf)
        self.block_size = ctx.cfg.engine.block_size
        self.inbox = Inbox()
        self.to_worker = {w: Sender(link) for w, link in links.to_worker.items()}
        self.receivers = [Receiver(link, self.inbox) for link in links.from_worker.values()]
        self.heartbeat = Heartbeater(list(self.to_worker.values()), ctx.cfg.timeouts.heartbeat_s,
                                     self.inbox)
        self.ranks = {w: RankState(w, topo.role(w).value) for w in topo.worker_ranks}
        self.decode = {d: self.ranks[d] for d in topo.decode_ranks}  # those that can decode
        self.prefill = {p: self.ranks[p] for p in topo.prefill_ranks}  # can prefill for others
        e = ctx.cfg.engine
        self.placer = Placer(self.policy, self.slo, e.block_size, e.max_prefill_tokens)
        self.requests: dict[int, RequestState] = {}
        self.kv = BackendStats()
        self.mover = Mover(self)
        # req_id -> (prefill rank, tokens to compute at most, prompt tokens)
        self._prefill_tokens: dict[int, tuple[int, int, int]] = {}
        self.max_model_len = 0
        self.ready = threading.Event()  # every worker said Ready (or the router failed)
        self.stopped = threading.Event()  # the router thread ended
        self.error: str | None = None
        self.stopping: str | None = None  # why new requests are refused while stopping
        self.clean_shutdown = False
        self.on_fatal = lambda: None  # set by serve(): stop the HTTP server
        self.on_stop_asked: Callable[[int], None] = lambda sig: None  # serve(): drain, as on a signal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)
        self._thread.start()

    # -- Backend, called from the asyncio loop: never blocks ---------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def submit(self, req_id: int, prompt_ids: list[int],
               params: SamplingParams) -> asyncio.Queue[RequestOutput]:
        return self.submit_n([req_id], prompt_ids, params)[0]

    def submit_n(self, req_ids: list[int], prompt_ids: list[int],
                 params: SamplingParams) -> list[asyncio.Queue[RequestOutput]]:
        """n choices of one prompt: the first is routed, the others fork off it (seed + i)."""
        reqs = [RequestState(req_id, tuple(prompt_ids), params.for_choice(i), asyncio.Queue(), -1)
                for i, req_id in enumerate(req_ids)]
        self.inbox.put(LOCAL, ("submit", reqs))
        return [r.queue for r in reqs]

    def abort(self, req_id: int) -> None:
        self.inbox.put(LOCAL, ("abort", req_id))

    def set_mode(self, rank: int, mode: str) -> Future[None]:
        """Elastic: the operator pins rank's mode ("auto": the policy again); see Mover.pin."""
        self.inbox.put(LOCAL, ("mode", (rank, mode, done := Future())))
        return done

    def healthy(self) -> tuple[bool, str]:
        if self.error is not None:
            return False, self.error
        if self.stopping is not None:
            return False, self.stopping
        if not self.ready.is_set():
            return False, "waiting for the workers to load the model"
        return True, f"{len(self.ranks)} workers ({self.ctx.cfg.topology.label})"

    def stats(self) -> BackendStats:
        ranks = [r.snapshot() for r in self.ranks.values()]
        kv = self.kv
        return dataclasses.replace(kv, ranks=ranks, flips=dict(kv.flips), demand=dict(kv.demand),
                                   migration_seconds=kv.migration_seconds.copy(),
                                   flip_seconds={k: v.copy() for k, v in kv.flip_seconds.items()})

    def begin_stop(self, why: str) -> None:
        """From now on the server is unavailable (503, `why`); requests in flight go on."""
        self.stopping = why

    def abort_all(self, why: str) -> None:
        """Fail every request in flight with `why`, freeing its blocks (a stop's grace ended)."""
        self.inbox.put(LOCAL, ("abort_all", why))

    def shutdown(self) -> None:
        """Shut every worker down in order and wait (bounded) for the router thread to end."""
        if not self.stopped.is_set():
            self.inbox.put(LOCAL, ("shutdown", None))
        self.stopped.wait(timeout=3 * self.ctx.cfg.timeouts.group_s)

    # -- the router thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                peer, item = self.inbox.get()  # type: ignore[misc]
                if peer == LOCAL:
                    kind, arg = item  # type: ignore[misc]
                    if kind == "shutdown":
                        self._shutdown_workers()
                        self.clean_shutdown = True
                        return
                    self._command(kind, arg)
                else:
                    self._message(peer, item)
        except BaseException as e:  # noqa: BLE001 - the server cannot go on without the router
            self._fail(f"{type(e).__name__}: {e}")
        finally:
            self.ready.set()
            self.stopped.set()

    def _fail(self, why: str) -> None:
        log.error("router failed: %s", why)
        self.error = f"router failed: {why}"
        for req in list(self.requests.values()):
            self._finish(req, FinishReason.ERROR, error=self.error)
        self.on_fatal()

    def _deliver(self, req: RequestState, out: RequestOutput) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(req.queue.put_nowait, out)

    def _emit(self, req: RequestState, out: RequestOutput) -> None:
        """Deliver out, the prompt's logprobs on the first output; hold it while they are due."""
        if req.awaits_prompt_lps:
            req.held.append(out)
            return
        if req.prompt_lps is not None and not req.lps_sent:
            out.prompt_logprobs, req.lps_sent = req.prompt_lps, True
        self._deliver(req, out)

    def _prompt_logprobs(self, msg: PromptLogprobs) -> None:
        req = self.requests.get(msg.req_id)
        if req is None:
            return  # ended meanwhile (abort, error): nothing waits for them
        req.prompt_lps = msg.entries
        held, req.held = req.held, []
        for out in held:
            self._emit(req, out)
        if req.deferred is not None:
            self._finish(req, *req.deferred)

    def _finish(self, req: RequestState, reason: FinishReason, last: TokenEntry | None = None,
                error: str | None = None) -> None:
        if error is None and reason in DONE and req.awaits_prompt_lps:
            req.deferred = (reason, last)  # finished on its decode rank: ends once they come
            return
        self.requests.pop(req.req_id, None)
        self.decode[req.decode].unfinished -= 1
        self.mover.ended(req.req_id)
        if error is not None or reason not in DONE:  # its prompt will never be reported done
            self._prefill_work_done(req.req_id)
        req.timeline.mark("finished")
        out = RequestOutput(req.req_id, [], True, reason, error, req.timeline.durations_ms(),
                            req.cached_tokens, req.prefill, req.decode)
        out = out if last is None else with_token(out, last)
        if error is not None or reason not in DONE:
            self._deliver(req, out)  # aborted or failed: what was held no longer matters
        else:
            self._emit(req, out)

    def _command(self, kind: str, arg: object) -> None:
        if kind == "submit":
            reqs: list[RequestState] = arg  # type: ignore[assignment]
            req = reqs[0]
            if self.policy == "prefix":
                req.hashes = block_hashes(list(req.prompt_ids), self.block_size)
            d, p = self._place(req)
            req.decode, local = d, p == d
            for r in reqs:
                r.decode, r.leader, r.local, r.prefill = d, (req if r is not req else None), local, p
                self.decode[d].unfinished += 1
                self.requests[r.req_id] = r
            req.followers = [r.req_id for r in reqs[1:]]
            self._prefill_work(req, p, len(req.prompt_ids))
            self.to_worker[d].send(Reserve(req.req_id, req.prompt_ids, req.sampling,
                                           tuple(req.followers), local))
        elif kind == "abort":
            req = self.requests.get(arg)  # type: ignore[arg-type]
            if req is not None:  # None: finished already (or never known), nothing holds it
                self._abort(req, FinishReason.ABORT)
        elif kind == "mode":
            self.mover.pin(*arg)  # type: ignore[misc]
        elif kind == "abort_all":
            for req in list(self.requests.values()):
                self._abort(req, FinishReason.ERROR, error=str(arg))
        else:
            raise ValueError(f"unknown router command {kind!r}")

    def _abort(self, req: RequestState, reason: FinishReason, error: str | None = None) -> None:
        """Abort on every rank holding the request (each frees its part once), then finish it."""
        self.to_worker[req.decode].send(Abort(req.req_id))
        if req.migrating_from is not None:  # paused there: that rank frees its blocks too
            self.to_worker[req.migrating_from].send(Abort(req.req_id))
        if req.prefill is not None and not req.prefill_done and not req.local:
            self.to_worker[req.prefill].send(Abort(req.req_id))
        # _finish takes its prompt off the prefill rank's queued work: a prompt dropped from a
        # rank's queue never gets a PrefillDone, and routing would count it for ever.
        self._finish(req, reason, error=error)

    def _prefill_work(self, req: RequestState, p: int, n: int) -> None:
        """Count the prompt on rank p's queued prefill work: n tokens at most (again: the new n)."""
        self._prefill_work_done(req.req_id)
        self.ranks[p].queued_tokens += n
        self._prefill_tokens[req.req_id] = (p, n, len(req.prompt_ids))

    def _prefill_work_done(self, req_id: int) -> int | None:
        """Take a prompt off its prefill rank's queued work once (PrefillDone or an abort,
        whichever comes first); its length, None the second time."""
        entry = self._prefill_tokens.pop(req_id, None)
        if entry is None:
            return None
        p, n, prompt_len = entry
        self.ranks[p].queued_tokens -= n
        return prompt_len

    def _message(self, peer: int, msg: object) -> None:
        match msg:
            case Tokens():
                self._tokens(peer, msg)
            case Reserved():
                self._reserved(msg)
            case PrefillDone():
                self._prefill_done(peer, msg)
            case PromptLogprobs():
                self._prompt_logprobs(msg)
            case Rejected() if self.mover.moving(msg.req_id):
                self.mover.stay(self.requests[msg.req_id])
            case Rejected():
                req = self.requests.get(msg.req_id)
                for r in self._group(req) if req is not None else ():
                    self._finish(r, FinishReason.ERROR, error=msg.reason.text)
            case Stats():
                self.ranks[peer].load = msg.load
                if self.elastic:
                    self.mover.observe(peer, msg.load, time.monotonic())
            case Ready():
                self._ready(peer, msg)
            case Paused():
                self.mover.paused(msg)
            case Migrated():
                self.mover.migrated(msg)
            case Fatal():
                raise RuntimeError(f"rank {msg.rank} failed: {msg.text}")
            case StopAsked():
                self.on_stop_asked(msg.signum)
            case Shutdown():
                raise LinkDown(f"rank {peer} shut down unasked")
            case _:
                raise ValueError(f"router: unexpected message from rank {peer}: {msg!r}")

    def _reserved(self, msg: Reserved) -> None:
        req = self.requests.get(msg.req_id)
        if req is None:
            return  # aborted meanwhile; the decode rank got the Abort after the Reserve
        if req.migrating_from is not None:  # a migration: the old rank sends what is missing
            self.to_worker[req.migrating_from].send(SendKV(req.req_id, req.decode, msg.held_tokens))
            return
        for r in self._group(req):
            r.timeline.mark("reserved", msg.t)
        p = req.prefill
        assert p is not None, "placed at submit"
        self._prefill_work(req, p, len(req.prompt_ids) - msg.held_tokens)  # to compute and send
        self.to_worker[p].send(Prefill(req.req_id, req.prompt_ids, req.decode,
                                        msg.held_tokens, req.sampling.prompt_logprobs))

    def _prefill_done(self, peer: int, msg: PrefillDone) -> None:
        prompt_len = self._prefill_work_done(msg.req_id)  # None: aborted before this
        if prompt_len is not None:  # its request may have finished already
            self.ranks[peer].prefilled_tokens += prompt_len - msg.cached_tokens
        req = self.requests.get(msg.req_id)
        for r in self._group(req) if req is not None else ():
            r.prefill, r.prefill_done, r.cached_tokens = peer, True, msg.cached_tokens
            r.timeline.mark("prefill_start", msg.t_start)
            r.timeline.mark("prefill_end", msg.t_end)

    def _ready(self, peer: int, msg: Ready) -> None:
        r = self.ranks[peer]
        r.ready, r.max_model_len, r.threads, r.cpus = True, msg.max_model_len, msg.threads, msg.cpus
        r.load = Load(free_blocks=msg.total_blocks, total_blocks=msg.total_blocks)
        r.index.resize(msg.total_blocks)
        if all(x.ready for x in self.ranks.values()):
            self.max_model_len = min(x.max_model_len for x in self.decode.values())
            log.info("all %d workers ready; max_model_len %d", len(self.ranks), self.max_model_len)
            self.ready.set()

    def _tokens(self, peer: int, msg: Tokens) -> None:
        rank = self.decode[peer]
        rank.load = msg.load
        rank.generated_tokens += len(msg.entries)
        if self.elastic:
            self.mover.observe(peer, msg.load, time.monotonic())
            self.mover.rebalance()
        for rec in msg.transfers:
            self.kv.kv_bytes_transferred += rec.num_bytes
            self.kv.kv_transfer_seconds += rec.seconds
            self.kv.kv_transfers += 1
            req = self.requests.get(rec.req_id)
            if req is not None:
                req.timeline.mark("kv_received", rec.t_end)
        for e in msg.entries:
            req = self.requests.get(e.req_id)
            if req is None:
                continue  # aborted here; the decode rank's copy is freed by its Abort
            req.generated += 1
            if req.first_token:
                req.first_token = False
                req.timeline.mark("first_token", msg.t)
                if req.local and req.sampling.prompt_logprobs is not None:
                    req.prompt_lps = e.prompt_logprobs  # computed with the first token
            if e.cached_tokens:  # the first token's prefix hit (PD: the prefill rank's, as in PrefillDone)
                req.cached_tokens = e.cached_tokens
            if e.finished:
                self._finish(req, e.finish_reason or FinishReason.STOP, e)
            else:
                self._emit(req, with_token(RequestOutput(req.req_id, [],
                                                          cached_tokens=req.cached_tokens), e))

    def _group(self, req: RequestState) -> list[RequestState]:
        """req and the other choices still here that fork off it (n > 1)."""
        return [req, *(self.requests[f] for f in req.followers if f in self.requests)]

    def _place(self, req: RequestState) -> tuple[int, int]:
        """(decode, prefill) ranks, from the Placer over a view of every rank: a PD or colocated
        rank's role fixes what it takes; an elastic rank's mode (decode: prefills only to help)."""
        views, prefix = [], self.policy == "prefix"
        for r in self.ranks.values():
            m = self.mover.policy.modes[r.rank] if self.elastic else None
            decodes = m is not Mode.PREFILL if m else r.rank in self.decode
            own = m is not Mode.DECODE if m else self.colocated
            others = m is not Mode.DECODE if m else r.rank in self.prefill
            views.append(RankView(r.rank, decodes, own, others, r.queued_tokens, r.unfinished, r.load.free_blocks,
                                  r.load.cost, m is Mode.DECODE, r.index.match(req.hashes) if prefix else 0))
        n = len(req.prompt_ids)
        pl = self.placer.place(n, blocks_for(n, self.block_size), views)
        log.debug("request %d -> decode %d, prefill %d: %s", req.req_id, pl.decode, pl.prefill, pl.reason)
        self._routed(self.ranks[pl.decode], req, pl.decode_matched)
        if pl.prefill != pl.decode:
            self._routed(self.ranks[pl.prefill], req, pl.prefill_matched)
        return pl.decode, pl.prefill

    def _routed(self, r: RankState, req: RequestState, matched: int) -> int:
        """Count the request on rank `r`; "prefix" records its blocks there."""
        r.routed += 1
        r.routed_prefix_tokens += matched * self.block_size
        r.index.insert(req.hashes)
        return r.rank

    def _shutdown_workers(self) -> None:
        """Ranks that only send KV first, then the rest; each answers."""
        for req in list(self.requests.values()):
            self._finish(req, FinishReason.ERROR, error="the server is shutting down")
        self.heartbeat.stop()
        senders_only = set(self.prefill) - set(self.decode)
        for group in (senders_only, set(self.ranks) - senders_only):
            for w in sorted(group):
                self.to_worker[w].close()
            waiting = set(group)
            while waiting:
                item = self.inbox.get(timeout=3 * self.ctx.cfg.timeouts.group_s)
                if item is None:
                    raise TimeoutError(f"ranks {sorted(waiting)} did not shut down")
                peer, msg = item
                if isinstance(msg, Shutdown):
                    waiting.discard(peer)
                elif isinstance(msg, Fatal):
                    raise RuntimeError(f"rank {msg.rank} failed while shutting down: {msg.text}")
                # anything else (late Tokens, Stats) no longer matters
        for r in self.receivers:
            r.thread.join(timeout=self.ctx.cfg.timeouts.group_s)
        log.info("all workers shut down")

