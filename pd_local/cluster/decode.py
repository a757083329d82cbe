"""The decode rank loop (also a colocated replica's): one Engine driven by messages. Reserve ->
the admission queue (Reserved says how much is cached); LayerKV -> `write_prompt_kv`;
PromptHidden -> `add_prefilled`; each turn with running sequences one `engine.step()`, its tokens
to the router. KV for a request no longer held is dropped; its blocks are freed exactly once."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable

from pd_local.cluster.dist import DistContext, Role
from pd_local.engine import threads as cpu_threads
from pd_local.engine.engine import Engine, TokenEvent
from pd_local.engine.structured import GrammarTokenizer
from pd_local.model.config import ModelConfig
from pd_local.model.dtype import resolve_dtype
from pd_local.model.weights import load_model
from pd_local.cluster.channel import Heartbeater, Inbox, Receiver, Sender
from pd_local.cluster.messages import (Abort, Fatal, FinishReason, ProtocolError, Ready,
                                       RejectReason, Rejected, Reserve, Reserved, Shutdown, Stats,
                                       TokenEntry, Tokens, TransferRecord)
from pd_local.tokenizer import Tokenizer
from pd_local.cluster.ipc_transfer import kv_receiver
from pd_local.cluster.transfer import KVShape, LayerKV, PromptHidden, StagingDone

log = logging.getLogger(__name__)

FINISH_CODES: dict[str | None, FinishReason] = {
    None: FinishReason.NONE, "stop": FinishReason.STOP, "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT, "error": FinishReason.ERROR,
}


def token_entry(ev: TokenEvent, cached_tokens: int | None = None) -> TokenEntry:
    """`cached_tokens`: the request's prefix hit to report with its first token; None: the
    event's own (a colocated rank's prefill). A PD decode rank's own hit is not the request's
    (it saves bytes, not compute): it passes the prefill rank's, from the KV header."""
    return TokenEntry(ev.req_id, ev.token_id, ev.finished, FINISH_CODES[ev.finish_reason],
                      ev.cached_tokens if cached_tokens is None else cached_tokens,
                      () if ev.logprob is None else (ev.logprob,), ev.prompt_logprobs)


class DecodeLoop:
    """Construct right after init_distributed, before the model loads: a gloo send waits for
    the receiver's recv and fails after the group timeout, so every incoming link needs its
    receiver thread, and every outgoing one its heartbeats, while the weights load."""

    def __init__(self, ctx: DistContext, shape: KVShape) -> None:
        self.ctx = ctx
        self.shape = shape
        self.colocated = ctx.role is Role.COLOCATED
        me = ctx.rank
        self.inbox = Inbox()
        self.receiver = Receiver(ctx.links.to_decode[me], self.inbox)
        self.to_router = Sender(ctx.links.from_decode[me])
        self.kv_receivers = [kv_receiver(ctx, pair, self.inbox, shape)  # CUDA IPC: same GPU
                             for pair in ctx.links.kv.values()]
        self.heartbeat = Heartbeater([self.to_router], ctx.cfg.timeouts.heartbeat_s, self.inbox)
        self.engine: Engine  # built by run()
        self.admission: deque[Reserve] = deque()
        self.aborted_followers: set[int] = set()  # choices aborted while their Reserve queued
        self.entries: list[TokenEntry] = []
        self.transfers: list[TransferRecord] = []
        self.last_load: tuple[int, int, int, int] | None = None

    # -- the loop ----------------------------------------------------------------------------

    def run(self, make_engine: Callable[[], Engine]) -> None:
        """Build the engine, then serve until the router's Shutdown. Any error: tell the router
        (Fatal), then raise."""
        try:
            self.engine = make_engine()
            self.to_router.send(Ready(self.engine.max_model_len, self.engine.num_total_blocks,
                                      *cpu_threads.in_effect()))
            while True:
                # Block only when there is nothing to step: then only a message can change that.
                item = self.inbox.get(timeout=0 if self._can_step() else None)
                while item is not None:
                    if isinstance(item[1], Shutdown):
                        self._shutdown()
                        return
                    self._handle(item[1])
                    item = self.inbox.poll()
                self._admit()
                if self.entries:
                    # First tokens sampled from arrived hidden states go out now, not after the
                    # decode step below (which would add one whole step to their TTFT).
                    self._report()
                if self._can_step():
                    self.entries += [token_entry(ev) for ev in self.engine.step()]
                    # A step that finished sequences freed room: admit queued reservations now.
                    # The loop blocks on its inbox next when nothing can step, and no message
                    # may ever come to wake it while reservations wait (a hang seen in tests).
                    self._admit()
                self._report()
        except BaseException as e:
            try:
                self.to_router.send(Fatal(self.ctx.rank, f"{type(e).__name__}: {e}"[:4000]))
            except Exception:  # the link may be what failed
                pass
            raise

    def _can_step(self) -> bool:
        return self.engine.has_work()

    def _handle(self, msg: object) -> None:
        engine = self.engine
        if isinstance(msg, LayerKV):
            if engine.awaits_kv(msg.req_id):
                engine.write_prompt_kv(msg.req_id, msg.layer, msg.k, msg.v, start=msg.start)
        elif isinstance(msg, PromptHidden):
            if engine.awaits_kv(msg.req_id):
                # the receiver counts a prompt's positions [0, end); its cached prefix never came
                cached = engine.cached_tokens(msg.req_id) * self.shape.bytes_per_token
                self.entries += [token_entry(ev, msg.cached_tokens)
                                 for ev in engine.add_prefilled(msg.req_id, msg.hidden)]
                self.transfers.append(dataclasses.replace(msg.record,
                                                          num_bytes=msg.record.num_bytes - cached))
        elif isinstance(msg, StagingDone):
            msg.release()  # every item of that transfer was consumed (copied) above, in order
        elif isinstance(msg, Reserve):
            if self.colocated:
                try:
                    engine.add_request(msg.req_id, list(msg.prompt_ids), msg.sampling, msg.followers)
                except ValueError as e:
                    self._reject(msg.req_id, e)
            else:
                self.admission.append(msg)
        elif isinstance(msg, Abort):
            queued = next((r for r in self.admission if msg.req_id in (r.req_id, *r.followers)), None)
            if queued is not None and queued.req_id == msg.req_id:
                # its other choices go on alone, each with its own seed (seed + i)
                i = self.admission.index(queued)
                del self.admission[i]
                for n, f in reversed(list(enumerate(queued.followers, start=1))):
                    if f in self.aborted_followers:
                        self.aborted_followers.discard(f)
                        continue
                    self.admission.insert(i, Reserve(f, queued.prompt_ids, queued.sampling.for_choice(n)))
            elif queued is not None:  # a choice of a queued request: dropped once it is reserved
                self.aborted_followers.add(msg.req_id)
            else:
                engine.abort(msg.req_id)  # False when it already finished: nothing to free
        else:
            raise ProtocolError(f"decode rank {self.ctx.rank}: unexpected {msg!r}")

    def _reject(self, req_id: int, e: Exception) -> None:
        log.warning("request %d rejected: %s", req_id, e)
        self.to_router.send(Rejected(req_id, RejectReason.BAD_REQUEST))

    def _admit(self) -> None:
        """Reserve the admission queue in order while the engine has room (FIFO: a big prompt
        at the head is not overtaken, so it cannot starve)."""
        while self.admission:
            msg = self.admission[0]
            try:
                ok = self.engine.reserve(msg.req_id, list(msg.prompt_ids), msg.sampling, msg.followers)
            except ValueError as e:
                self.admission.popleft()
                self.aborted_followers.difference_update(msg.followers)  # rejected with it
                self._reject(msg.req_id, e)
                continue
            if not ok:
                return
            self.admission.popleft()
            for f in self.aborted_followers.intersection(msg.followers):
                self.aborted_followers.discard(f)
                self.engine.abort(f)
            self.to_router.send(Reserved(msg.req_id, time.monotonic(),
                                         self.engine.cached_tokens(msg.req_id)))

    def _load(self) -> tuple[int, int, int, int]:
        e = self.engine
        return (e.num_free_blocks, e.num_total_blocks, e.num_running,
                e.num_waiting + len(self.admission))

    def _report(self) -> None:
        """One Tokens message per turn that produced tokens or transfers; otherwise Stats when
        the load changed (so the router routes on fresh numbers without polling)."""
        load = self._load()
        cache = dict(cached_blocks=self.engine.num_cached_blocks,
                     prefix_hit_tokens=self.engine.prefix_hit_tokens)
        if self.entries or self.transfers:
            self.to_router.send(Tokens(tuple(self.entries), *load, time.monotonic(),
                                       tuple(self.transfers), **cache))
            self.entries, self.transfers = [], []
        elif load != self.last_load:
            self.to_router.send(Stats(*load, queued_tokens=0, **cache))
        self.last_load = load

    def _shutdown(self) -> None:
        """The router's Shutdown: answer it, and wait until every prefill rank has closed its
        KV link to us (they shut down first), so no receive is pending when the groups go."""
        self.heartbeat.stop()
        self.to_router.close()
        for r in self.kv_receivers:
            r.thread.join(timeout=self.ctx.cfg.timeouts.group_s)
            if r.thread.is_alive():
                raise RuntimeError(f"kv link {r.pair.data.name} was not closed by its prefill rank")
        log.info("decode rank %d: shut down (%d transfers received)", self.ctx.rank,
                 sum(len(r.stats) for r in self.kv_receivers))


def run(ctx: DistContext) -> None:
    """Entry point for a decode or colocated rank (launch.py)."""
    cfg = ctx.cfg
    dtype = resolve_dtype(cfg.dtype, cfg.device)  # "auto": same answer on every rank (one machine)
    loop = DecodeLoop(ctx, KVShape.of(ModelConfig.from_dir(cfg.model), dtype))

    def make_engine() -> Engine:
        model, _ = load_model(cfg.model, dtype, ctx.device)
        tokenizer = Tokenizer.from_dir(cfg.model)
        return Engine(model, cfg.engine, stop_token_ids=tokenizer.stop_token_ids,
                      device=ctx.device, grammar_tokenizer=GrammarTokenizer(tokenizer))

    loop.run(make_engine)
