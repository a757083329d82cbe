"""The worker loop, run by every rank but the router: one Engine driven by messages, its role
data (ctx.role: prefill, decode or colocated; docs/architecture.md). Each turn: messages,
admission, one `engine.step()`, then tokens, KV and load out. KV for a request no longer held
is dropped; its blocks are freed exactly once."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable

import torch

from pd_local.cluster.channel import Heartbeater, Inbox, Receiver, Sender
from pd_local.cluster.dist import DistContext, Role
from pd_local.cluster.ipc_transfer import kv_ends
from pd_local.cluster.lockstep import Landed
from pd_local.cluster.messages import (Abort, Fatal, KVEntry, MigrateOut, Migrated, Paused, Prefill,
                                       PrefillDone, PromptLogprobs, ProtocolError, Ready, RejectReason,
                                       Rejected, Reserve, Reserved, SendKV, Shutdown, Stats, Stay, StopAsked,
                                       TokenEntry, Tokens, TransferMode, TransferRecord)
from pd_local.cluster.transfer import KVShape, LayerKV, PromptHidden, StagingDone, rows_of
from pd_local.config import EngineConfig
from pd_local.engine import threads as cpu_threads
from pd_local.engine.engine import Engine
from pd_local.engine.events import Load, TokenEvent
from pd_local.engine.kv_cache import blocks_for
from pd_local.engine.scheduler import PrefillChunk
from pd_local.engine.structured import GrammarTokenizer
from pd_local.model.config import ModelConfig
from pd_local.model.dtype import resolve_dtype
from pd_local.model.llama import LayerKVHook, LlamaForCausalLM
from pd_local.model.tp import shard
from pd_local.model.weights import load_model
from pd_local.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def token_entry(ev: TokenEvent, cached_tokens: int | None = None) -> TokenEntry:
    """`cached_tokens`: the prefill rank's hit, from the KV header; None: the event's own."""
    return TokenEntry(ev.req_id, ev.token_id, ev.finished, ev.finish_reason,
                      ev.cached_tokens if cached_tokens is None else cached_tokens,
                      () if ev.logprob is None else (ev.logprob,), ev.prompt_logprobs)


class Worker:
    """Construct before the model loads: every link's receiver and heartbeats must run while
    the weights load (a gloo send fails after the group timeout; docs/design.md)."""

    def __init__(self, ctx: DistContext, shape: KVShape) -> None:
        self.ctx, self.shape, self.role = ctx, shape, ctx.role
        me, links = ctx.rank, ctx.links
        self.inbox = Inbox()
        self.lockstep = ctx.lockstep  # a TP instance's rank: its turns are its leader's
        up = Sender(links.from_worker[me])
        if me in links.to_worker:
            self.receiver = Receiver(links.to_worker[me], self.inbox)
            self.to_router: Sender | Muted = up
        else:  # a TP follower: the router talks to its leader
            self.to_router = Muted(up)
        # KV links: it sends on those it is the prefill end of (CUDA IPC for a same-GPU pair)
        self.kv_out, self.kv_in, self.kv_senders = kv_ends(ctx, shape, self.inbox, TransferMode[ctx.cfg.transfer.upper()])
        self.senders = ctx.topology.senders(me)  # the prefill ranks a prompt's KV comes from
        self.heartbeat = Heartbeater([up, *(s.header for s in self.kv_senders)], ctx.cfg.timeouts.heartbeat_s, self.inbox)
        if self.ctx.signals is not None:  # a stop signal to this rank stops the server (rank 0 drains)
            self.ctx.signals.ask = lambda sig: self.to_router.send(StopAsked(self.ctx.rank, sig))
        self.hiddens: dict[int, list[PromptHidden]] = {}  # TP: a prompt's, one per sender so far
        self.early: dict[int, list[LayerKV | PromptHidden]] = {}  # a TP follower's, before it reserved
        self.gone: set[int] = set()  # requests a TP follower aborted: their late KV is dropped
        self.landed: list[Landed] = []  # a TP leader's completed prompts, for its next share
        self.engine: Engine  # built by run()
        self.admission: deque[Reserve] = deque()
        self.aborted_followers: set[int] = set()  # choices aborted while their Reserve queued
        self.started: dict[int, float] = {}  # prompt sent on -> its first chunk's step start
        self.entries: list[TokenEntry] = []
        self.transfers: list[TransferRecord] = []
        self.last_load: Load | None = None
        self.tpot_ms = 0.0  # its decode rows' recent step time
        self.paused: dict[int, int] = {}  # migrating out -> its KV's end (positions [0, end))
        self.migrating_in: set[int] = set()

    def run(self, make_engine: Callable[[], Engine]) -> None:
        """Build the engine, serve until the router's Shutdown; any error: Fatal, then raise."""
        try:
            self.engine = e = make_engine()
            self.to_router.send(Ready(0 if self.role is Role.PREFILL else e.max_model_len,
                                      e.num_total_blocks, *cpu_threads.in_effect()))
            while True:
                for msg in self._messages():
                    if isinstance(msg, Shutdown):
                        self._shutdown()
                        return
                    self._handle(msg)
                self._admit()
                if self.entries:
                    # first tokens from arrived hidden states: now, not a step later (TTFT)
                    self._report()
                if e.has_work():
                    self._step()
                    # room a step freed: admit now, no message may come to wake the loop
                    self._admit()
                self._report()
        except BaseException as e:
            try:
                self.to_router.send(Fatal(self.ctx.rank, f"{type(e).__name__}: {e}"[:4000]))
            except Exception:  # the link may be what failed
                pass
            raise

    # -- messages ----------------------------------------------------------------------------

    def _messages(self) -> list[object]:
        """This turn's messages; blocks only with nothing to step (a TP leader: idle_s at most)."""
        ls, msgs = self.lockstep, []
        if ls is not None and not ls.is_leader:
            return ls.share([])
        item = self.inbox.get(timeout=0 if self.engine.has_work() else ls and ls.idle_s)
        while item is not None:
            if ls is not None and isinstance(item[1], (LayerKV, PromptHidden, StagingDone)):
                self._handle(item[1])  # this rank's own KV; a prompt it completes is shared as Landed
                msgs += self.landed
                self.landed = []
            else:
                msgs.append(item[1])
            item = None if isinstance(item[1], Shutdown) else self.inbox.poll()
        return msgs if ls is None else ls.share(msgs)

    def _handle(self, msg: object) -> None:
        e = self.engine
        match msg:
            case LayerKV() if e.awaits_kv(msg.req_id):
                e.write_prompt_kv(msg.req_id, msg.layer, msg.k, msg.v, start=msg.start, heads=msg.heads)
            case PromptHidden() if msg.req_id in self.migrating_in and e.awaits_kv(msg.req_id):
                self._resume(msg.req_id, msg.record.num_bytes)
            case PromptHidden() if e.awaits_kv(msg.req_id):
                got = self.hiddens.setdefault(msg.req_id, [])  # a copy: StagingDone frees the staging
                got.append(dataclasses.replace(msg, hidden=msg.hidden.clone()))
                if len(got) == self.senders and self.lockstep is None:
                    self._land(msg.req_id)
                elif len(got) == self.senders and self.lockstep.is_leader:  # type: ignore[union-attr]
                    self.landed.append(Landed(msg.req_id))  # shared first, then landed on every rank
            case Landed() if e.awaits_kv(msg.req_id):
                self._await_kv(msg.req_id)
                self._land(msg.req_id)
            case LayerKV() | PromptHidden() | Landed():
                pass  # its request is gone (aborted): the blocks were freed then
            case StagingDone():
                msg.release()  # every item of that transfer was consumed (copied) above, in order
            case Prefill():
                if msg.decode_rank not in self.kv_out:
                    raise ProtocolError(f"Prefill for decode rank {msg.decode_rank}: no KV link from "
                                        f"rank {self.ctx.rank} (links: {sorted(self.kv_out)})")
                e.add_prompt(msg.req_id, list(msg.prompt_ids), msg.decode_rank, msg.skip_tokens,
                             msg.prompt_logprobs)
            case Reserve() if msg.local and self.role is not Role.PREFILL:
                try:
                    e.add_request(msg.req_id, list(msg.prompt_ids), msg.sampling, msg.followers)
                except ValueError as err:
                    self._reject(msg.req_id, err)
            case Reserve() if self.role is not Role.PREFILL:
                self.admission.append(msg)
            case Abort():
                self._abort(msg.req_id)
            case MigrateOut():
                self._migrate_out(msg)
            case SendKV() if msg.req_id in self.paused:
                self._send_kv(msg)
            case Stay() if msg.req_id in self.paused:
                del self.paused[msg.req_id]
                e.end_migration(msg.req_id, moved=False)
            case SendKV() | Stay():
                pass  # aborted meanwhile: its blocks were freed then
            case _:
                raise ProtocolError(f"{self.role.value} rank {self.ctx.rank}: unexpected {msg!r}")

    def _await_kv(self, req_id: int) -> None:
        """A TP follower at its leader's Landed: its own KV of the prompt, from its own links.
        Another prompt's item waits (a copy) unless this rank reserved that prompt already: the
        leader may have reserved it in a turn this rank has not reached."""
        for msg in self.early.pop(req_id, []):
            self._handle(msg)
        while len(self.hiddens.get(req_id, ())) < self.senders:
            item = self.inbox.get(timeout=self.ctx.cfg.timeouts.group_s)
            if item is None:
                raise RuntimeError(f"rank {self.ctx.rank}: request {req_id}'s KV did not land")
            msg, r = item[1], getattr(item[1], "req_id", req_id)
            if r == req_id or self.engine.awaits_kv(r) or isinstance(msg, StagingDone):
                self._handle(msg)
            elif r not in self.gone and isinstance(msg, LayerKV):
                self.early.setdefault(r, []).append(dataclasses.replace(msg, k=msg.k.clone(), v=msg.v.clone()))
            elif r not in self.gone and isinstance(msg, PromptHidden):
                self.early.setdefault(r, []).append(dataclasses.replace(msg, hidden=msg.hidden.clone()))

    def _land(self, req_id: int) -> None:
        """Every sender's KV of the prompt is here: decode it. The receivers count a prompt's
        positions [0, end), the cached prefix never came; a TP rank's share times its instance."""
        got, e = self.hiddens.pop(req_id), self.engine
        cached = e.held_tokens(req_id) * self.shape.bytes_per_token
        self.entries += [token_entry(ev, got[0].cached_tokens) for ev in e.add_prefilled(req_id, got[0].hidden)]
        moved = sum(m.record.num_bytes for m in got) * len(self.ctx.instance) - cached
        self.transfers.append(dataclasses.replace(got[0].record, num_bytes=moved))

    def _abort(self, req_id: int) -> None:
        queued = next((r for r in self.admission if req_id in (r.req_id, *r.followers)), None)
        if queued is not None and queued.req_id == req_id:
            # its other choices go on alone, each with its own seed (seed + i)
            i = self.admission.index(queued)
            del self.admission[i]
            for n, f in reversed(list(enumerate(queued.followers, start=1))):
                if f in self.aborted_followers:
                    self.aborted_followers.discard(f)
                    continue
                self.admission.insert(i, Reserve(f, queued.prompt_ids, queued.sampling.for_choice(n)))
        elif queued is not None:  # a choice of a queued request: dropped once it is reserved
            self.aborted_followers.add(req_id)
        elif self.engine.abort(req_id):  # False when it already finished: nothing to free
            self.started.pop(req_id, None)
        self.paused.pop(req_id, None)
        self.hiddens.pop(req_id, None)
        self.migrating_in.discard(req_id)
        if self.lockstep is not None and not self.lockstep.is_leader:
            self.early.pop(req_id, None)
            self.gone.add(req_id)

    def _reject(self, req_id: int, e: Exception) -> None:
        log.warning("request %d rejected: %s", req_id, e)
        self.to_router.send(Rejected(req_id, RejectReason.BAD_REQUEST))

    def _admit(self) -> None:
        """Reserve the admission queue in order while the engine has room (FIFO: a big prompt
        at the head is not overtaken, so it cannot starve)."""
        while self.admission:
            msg = self.admission[0]
            try:
                if msg.output_ids:  # a migration: its KV comes from the rank it decoded on
                    ok = self.engine.migrate_in(msg.req_id, list(msg.prompt_ids), list(msg.output_ids), msg.sampling,
                                                torch.tensor(msg.rng_state, dtype=torch.uint8) if msg.rng_state else None)
                    self.migrating_in.update([msg.req_id] if ok else [])
                else:
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
            held = self.engine.held_tokens(msg.req_id)
            self.to_router.send(Reserved(msg.req_id, time.monotonic(), held))
            if msg.output_ids and held == len(msg.prompt_ids) + len(msg.output_ids) - 1:
                self._resume(msg.req_id, 0)  # its prefix cache held every position: no KV comes

    # -- live migration ------------------------------------------------------------------------

    def _migrate_out(self, msg: MigrateOut) -> None:
        """Stop decoding the request; Paused tells the router what it generated (nothing: it
        cannot move now, e.g. it finished or is still prefilling)."""
        try:
            seq = self.engine.migrate_out(msg.req_id)
        except ValueError as err:
            log.info("request %d stays on rank %d: %s", msg.req_id, self.ctx.rank, err)
            self.to_router.send(Paused(msg.req_id, ()))
            return
        g = seq.generator
        state = tuple(g.get_state().tolist()) if g is not None else ()  # type: ignore[attr-defined]
        self.paused[msg.req_id] = seq.num_tokens - 1
        self.to_router.send(Paused(msg.req_id, tuple(seq.output_ids), state))

    def _send_kv(self, msg: SendKV) -> None:
        """The KV the destination lacks, every layer, then its blocks here are free."""
        end, e = self.paused.pop(msg.req_id), self.engine
        if msg.skip < end:
            sender = self.kv_out[msg.dst]
            sender.start([KVEntry(msg.req_id, end - msg.skip, msg.skip, True, 0)])
            for layer in range(e.model.config.num_layers):
                sender.layer(layer, *e.read_kv(msg.req_id, layer, msg.skip, end))
            sender.hidden(torch.zeros(1, e.model.config.hidden_size, dtype=e.dtype, device=e.device))
            sender.finish()
        e.end_migration(msg.req_id)

    def _resume(self, req_id: int, num_bytes: int) -> None:
        self.migrating_in.discard(req_id)
        self.engine.resume(req_id)
        self.to_router.send(Migrated(req_id, time.monotonic(), num_bytes))

    # -- the step ------------------------------------------------------------------------------

    def _step(self) -> None:
        """One engine step; prompts for other ranks: announce per destination, each layer's K/V
        leaves as it is computed, then the completed prompts' hidden states."""
        t0 = time.monotonic()
        sending: list[int] = []  # destinations of this step, in row order
        planned: list[bool] = []

        def on_plan(chunks: list[PrefillChunk]) -> LayerKVHook | None:
            planned.append(True)
            tokens: dict[int, list[tuple[int, int]]] = {}  # destination -> its rows of the step
            for d, group in itertools.groupby((c for c in chunks if c.seq.send_to is not None),
                                              key=lambda c: c.seq.send_to):
                group = list(group)
                for c in group:
                    self.started.setdefault(c.seq.req_id, t0)
                # only the rows the destination lacks (its prefix cache holds [0, skip))
                group = [c for c in group if c.send_rows[1] > c.send_rows[0]]
                if group:
                    tokens[d] = [c.send_rows for c in group]  # type: ignore[index]
                    self.kv_out[d].start([KVEntry(c.seq.req_id, c.end - c.send_from, c.send_from, c.is_last,  # type: ignore[index]
                                                  c.seq.num_cached if c.is_last else 0) for c in group])
            sending.extend(tokens)
            if not tokens:
                return None

            def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                for d, pieces in tokens.items():
                    self.kv_out[d].layer(layer, *rows_of(k, v, pieces))
            return on_layer_kv

        e = self.engine
        rows = e.num_running
        if self.role is Role.ELASTIC and self.ctx.cfg.slo.tpot_budget:  # decode rows' mean step within TPOT
            cfg, (_, queued, waited) = self.ctx.cfg, e.prefill_backlog()
            e.set_prefill_budget(e.cost.cost().prefill_budget(
                rows, cfg.slo.tpot_ms, cfg.engine.block_size, cfg.engine.max_prefill_tokens,
                queued, cfg.slo.ttft_ms - waited, self.tpot_ms))
        events = e.step(on_plan)
        if rows:  # what its decode rows waited per token, lately (a moving average over ~8 steps)
            self.tpot_ms += (1000 * (time.monotonic() - t0) - self.tpot_ms) / 8
        if not planned and self.role is Role.PREFILL:
            raise RuntimeError(f"prefill rank {self.ctx.rank}: prompts pending, none planned")
        t_computed = time.monotonic()
        for r in e.prefill_started:  # its own prompts' prefill phase, for the timings
            self.started.setdefault(r, t0)
        for ev in events:
            t_start = self.started.pop(ev.req_id, None)
            if t_start is not None and ev.first:  # a recompute after preemption is no new prefill
                self.to_router.send(PrefillDone(ev.req_id, t_start, t_computed, ev.cached_tokens))
        self.entries += [token_entry(ev) for ev in events]
        for ev in events if self.lockstep else ():
            self.lockstep.record(ev.req_id, ev.token_id)
        for p in e.prompts_done:  # before the hidden states
            if p.prompt_logprobs is not None:
                self.to_router.send(PromptLogprobs(p.req_id, p.prompt_logprobs))
        for d in sending:
            mine = [p.hidden for p in e.prompts_done if p.send_to == d]
            self.kv_out[d].hidden(torch.stack(mine) if mine else torch.empty(0, e.model.config.hidden_size,
                                                                             dtype=e.dtype, device=e.device))
        for d in sending:
            self.kv_out[d].finish()
        for p in e.prompts_done:
            self.to_router.send(PrefillDone(p.req_id, self.started.pop(p.req_id), t_computed, p.num_cached))

    def _load(self) -> Load:
        load = self.engine.load()
        if self.role is Role.PREFILL:  # its prompts queued or part-prefilled wait, none runs
            prompts, tokens, _ = self.engine.prefill_backlog()
            return dataclasses.replace(load, running=0, waiting=prompts, queued_tokens=tokens)
        return dataclasses.replace(load, waiting=load.waiting + len(self.admission))

    def _report(self) -> None:
        """One Tokens message per turn that produced tokens or transfers; otherwise Stats when
        the load changed (so the router routes on fresh numbers without polling)."""
        load = self._load()
        if self.entries or self.transfers:
            self.to_router.send(Tokens(tuple(self.entries), load, time.monotonic(), tuple(self.transfers)))
            self.entries, self.transfers = [], []
        elif load != self.last_load:
            self.to_router.send(Stats(load))
        self.last_load = load

    def _shutdown(self) -> None:
        """Close the KV links it sends on, answer the router, wait until every prefill rank has
        closed its KV link to us (they stop first): no receive is pending when the groups go."""
        self.heartbeat.stop()
        for s in self.kv_senders:
            s.header.close()
        self.to_router.close()
        for r in self.kv_in:
            r.thread.join(timeout=self.ctx.cfg.timeouts.group_s)
            if r.thread.is_alive():
                raise RuntimeError(f"kv link {r.pair.data.name} was not closed by its prefill rank")
        log.info("%s rank %d: shut down (%d transfers received; KV blocks free %d of %d)", self.role.value,
                 self.ctx.rank, sum(len(r.stats) for r in self.kv_in), self.engine.num_free_blocks,
                 self.engine.num_total_blocks)


class Muted:
    """A TP follower's link to the router: heartbeats, Fatal, StopAsked, Shutdown; no reports."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    def send(self, msg: object) -> None:
        if isinstance(msg, (Fatal, StopAsked)):
            self.sender.send(msg)

    def close(self) -> None:
        self.sender.close()


def prefill_engine(model: LlamaForCausalLM, e: EngineConfig, device: torch.device | str) -> Engine:
    """Its cache: 2 longest prompts + one step's tokens (docs/architecture.md). No decode kernels."""
    mc = model.config
    longest = min(e.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
    blocks = blocks_for(2 * longest + e.max_prefill_tokens, e.block_size)
    return Engine(model, dataclasses.replace(e, num_blocks=blocks, cuda_graphs=False, native_linear=False),
                  device=device)


def run(ctx: DistContext) -> None:
    """Entry point for every worker rank (launch.py)."""
    cfg = ctx.cfg
    dtype = resolve_dtype(cfg.dtype, cfg.device)  # "auto": same answer on every rank (one machine)
    worker = Worker(ctx, KVShape.of(ModelConfig.from_dir(cfg.model), dtype))

    def make_engine() -> Engine:
        model, _ = load_model(cfg.model, dtype, ctx.device)
        if ctx.lockstep is not None:  # this rank's share of a TP instance
            model = shard(model, ctx.instance.index(ctx.rank), len(ctx.instance), ctx.tp_group)
        if ctx.role is Role.PREFILL:
            return prefill_engine(model, cfg.engine, ctx.device)
        tokenizer = Tokenizer.from_dir(cfg.model)
        e = Engine(model, dataclasses.replace(cfg.engine, cuda_graphs=cfg.engine.cuda_graphs and not ctx.lockstep),
                   stop_token_ids=tokenizer.stop_token_ids,
                   device=ctx.device, grammar_tokenizer=GrammarTokenizer(tokenizer))
        if ctx.lockstep is not None:
            ctx.lockstep.agree("KV blocks, context", (e.num_total_blocks, e.max_model_len))
        return e

    worker.run(make_engine)
