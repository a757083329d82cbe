"""The contract between the HTTP front-end and what generates tokens: `InProcessBackend` (an
Engine in a thread) or the router of a torchrun launch. `submit`/`abort` never block the asyncio
loop; outputs reach each request's queue through `call_soon_threadsafe`, and every request gets
exactly one output with `finished=True`, after which nothing more."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pd_local.engine import threads as cpu_threads
from pd_local.engine.engine import Engine, TokenEvent
from pd_local.engine.logprobs import Logprob
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import FinishReason

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    req_id: int
    token_ids: list[int]  # tokens new since the previous output
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    timings_ms: dict[str, float] | None = None  # phase durations, on the finished output
    # prompt tokens served from a prefix cache, not computed (the first prefill's, if a
    # preemption recomputed it); set on the output of the first token (colocated) or on every
    # output once the prefill rank has reported it (PD): a consumer keeps the value it saw
    cached_tokens: int = 0
    # on the finished output: the ranks it was routed to for its prefill and its decode
    # (colocated: the same rank twice; None: not routed there before it ended)
    prefill_rank: int | None = None
    decode_rank: int | None = None
    logprobs: list[Logprob] | None = None  # one per token of token_ids, when the request asked
    prompt_logprobs: tuple[Logprob, ...] | None = None  # prompt tokens 1..n-1, on one output


@dataclass
class RankStats:
    rank: int
    role: str
    free_blocks: int
    total_blocks: int
    running: int
    waiting: int
    cached_blocks: int = 0  # free blocks whose KV the prefix cache keeps (part of free_blocks)
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache since start
    routed: int = 0  # requests the router sent to this rank, ever
    routed_prefix_tokens: int = 0  # of their prompt tokens, those the router expected cached
    # Prefill ranks: prompt tokens the router has sent there and not yet seen prefilled or
    # aborted (what "least queued prefill work" routing compares); 0 elsewhere.
    queued_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens this rank computed (not cached), ever
    generated_tokens: int = 0  # tokens this rank sampled, ever
    threads: int = 0  # CPU threads it computes with, on these CPUs (engine/threads.py)
    cpus: str = ""


@dataclass
class BackendStats:
    ranks: list[RankStats] = field(default_factory=list)
    kv_bytes_transferred: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfers: int = 0


class Backend(Protocol):
    max_model_len: int

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def submit(self, req_id: int, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue[RequestOutput]: ...

    def submit_n(self, req_ids: list[int], prompt_ids: list[int],
                 params: SamplingParams) -> list[asyncio.Queue[RequestOutput]]:
        """n choices of one prompt, prefilled once; choice i samples with seed + i."""
        ...

    def abort(self, req_id: int) -> None: ...

    def healthy(self) -> tuple[bool, str]: ...

    def stats(self) -> BackendStats: ...

    def shutdown(self) -> None: ...


class Timeline:
    """Phase timestamps of one request (time.monotonic(), comparable across ranks on one host)."""

    PHASES = ("queued", "reserved", "prefill_start", "prefill_end", "kv_received", "first_token", "finished")

    def __init__(self) -> None:
        self.t: dict[str, float] = {"queued": time.monotonic()}
        self.token_times: list[float] = []

    def mark(self, phase: str, at: float | None = None) -> None:
        self.t.setdefault(phase, time.monotonic() if at is None else at)

    def durations_ms(self) -> dict[str, float]:
        """queue, reserve_wait, prefill, kv_transfer, first_decode, decode, total: whichever the
        request went through (a colocated request has no reservation or transfer)."""
        t = self.t
        out: dict[str, float] = {}

        def span(name: str, a: str, b: str) -> None:
            if a in t and b in t:
                out[name] = round((t[b] - t[a]) * 1000.0, 3)

        span("reserve_wait", "queued", "reserved")
        span("queue", "reserved" if "reserved" in t else "queued", "prefill_start")
        span("prefill", "prefill_start", "prefill_end")
        span("kv_transfer", "prefill_end", "kv_received")
        span("first_decode", "kv_received" if "kv_received" in t else "prefill_end", "first_token")
        span("decode", "first_token", "finished")
        span("ttft", "queued", "first_token")
        span("total", "queued", "finished")
        return out


class InProcessBackend:
    """An Engine driven by one thread of this process (colocated, no torch.distributed)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self._cmds: queue.Queue[tuple[str, object]] = queue.Queue()
        self._queues: dict[int, asyncio.Queue[RequestOutput]] = {}
        self._timelines: dict[int, Timeline] = {}
        self._prompt_lens: dict[int, int] = {}  # requests whose first token has not come yet
        self._leader_tl: dict[int, Timeline] = {}  # n > 1: a choice -> its leader's timeline
        self._prefilled = 0
        self._generated = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: str | None = None
        self._threads = (0, "")  # (torch threads, CPUs) of the engine thread, once it runs

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    def submit(self, req_id: int, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue[RequestOutput]:
        return self.submit_n([req_id], prompt_ids, params)[0]

    def submit_n(self, req_ids: list[int], prompt_ids: list[int],
                 params: SamplingParams) -> list[asyncio.Queue[RequestOutput]]:
        queues: list[asyncio.Queue[RequestOutput]] = [asyncio.Queue() for _ in req_ids]
        self._queues.update(zip(req_ids, queues))
        self._cmds.put(("add", (req_ids, prompt_ids, params, [Timeline() for _ in req_ids])))
        return queues

    def abort(self, req_id: int) -> None:
        self._cmds.put(("abort", req_id))

    def healthy(self) -> tuple[bool, str]:
        if self._error:
            return False, self._error
        alive = self._thread is not None and self._thread.is_alive()
        return alive, "engine thread running" if alive else "engine thread not running"

    def stats(self) -> BackendStats:
        e = self.engine
        return BackendStats(ranks=[RankStats(0, "colocated", e.num_free_blocks, e.num_total_blocks,
                                             e.num_running, e.num_waiting, e.num_cached_blocks,
                                             e.prefix_hit_tokens, prefilled_tokens=self._prefilled,
                                             generated_tokens=self._generated,
                                             threads=self._threads[0], cpus=self._threads[1])])

    def shutdown(self) -> None:
        self._stop.set()
        self._cmds.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- engine thread ---------------------------------------------------------------------

    def _deliver(self, out: RequestOutput) -> None:
        q = self._queues.get(out.req_id)
        if q is None or self._loop is None:
            return
        if out.finished:
            self._queues.pop(out.req_id, None)
        self._loop.call_soon_threadsafe(q.put_nowait, out)

    def _finish(self, req_id: int, reason: FinishReason, error: str | None = None,
                ev: TokenEvent | None = None) -> None:
        tl = self._timelines.pop(req_id, None)
        self._prompt_lens.pop(req_id, None)
        self._leader_tl.pop(req_id, None)
        timings = None
        if tl is not None:
            tl.mark("finished")
            timings = tl.durations_ms()
        out = RequestOutput(req_id, [], True, reason, error, timings, prefill_rank=0, decode_rank=0)
        self._deliver(out if ev is None else _with_token(out, ev))

    def _handle(self, kind: str, arg: object) -> None:
        if kind == "add":
            req_ids, prompt_ids, params, tls = arg  # type: ignore[misc]
            self._timelines.update(zip(req_ids, tls))
            self._prompt_lens[req_ids[0]] = len(prompt_ids)  # computed once for all n
            self._leader_tl.update((r, tls[0]) for r in req_ids[1:])
            try:
                self.engine.add_request(req_ids[0], prompt_ids, params, tuple(req_ids[1:]))
            except ValueError as e:
                for req_id in req_ids:
                    self._finish(req_id, FinishReason.ERROR, str(e))
        elif kind == "abort":
            req_id = int(arg)  # type: ignore[arg-type]
            if self.engine.abort(req_id):
                self._finish(req_id, FinishReason.ABORT)

    def _run(self) -> None:
        if self.engine.cfg.threads:
            torch.set_num_threads(self.engine.cfg.threads)
        self._threads = cpu_threads.in_effect()
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished()
                try:
                    kind, arg = self._cmds.get(timeout=0.1) if block else self._cmds.get_nowait()
                    self._handle(kind, arg)
                    while True:  # drain everything that arrived, then step once
                        kind, arg = self._cmds.get_nowait()
                        self._handle(kind, arg)
                except queue.Empty:
                    pass
                if not self.engine.has_unfinished():
                    continue
                t0 = time.monotonic()
                events = self.engine.step()
                t1 = time.monotonic()
                for r in self.engine.prefill_started:  # a recompute's start: the first mark sticks
                    tl = self._timelines.get(r)
                    if tl is not None:
                        tl.mark("prefill_start", t0)
                self._generated += len(events)
                for ev in events:
                    n = self._prompt_lens.pop(ev.req_id, None)
                    if n is not None:  # its first token: the prompt is done
                        self._prefilled += n - ev.cached_tokens
                    tl = self._timelines.get(ev.req_id)
                    leader = self._leader_tl.pop(ev.req_id, None)
                    if tl is not None and "first_token" not in tl.t:
                        if "prefill_start" in tl.t:  # it prefilled here
                            tl.mark("prefill_end", t1)
                        elif leader is not None:  # forked off its leader's prefill
                            for phase in ("prefill_start", "prefill_end"):
                                if phase in leader.t:
                                    tl.mark(phase, leader.t[phase])
                        tl.mark("first_token", t1)
                    if ev.finished:
                        self._finish(ev.req_id, ev.finish_reason or FinishReason.STOP, ev=ev)
                    else:
                        self._deliver(_with_token(RequestOutput(ev.req_id, []), ev))
        except Exception as e:  # the engine is broken: fail every request loudly, stay unhealthy
            log.exception("engine thread died")
            self._error = f"engine thread died: {e!r}"
            for req_id in list(self._queues):
                self._finish(req_id, FinishReason.ERROR, self._error)


def _with_token(out: RequestOutput, ev: TokenEvent) -> RequestOutput:
    """out carrying ev's token, its logprob and (first token) the prompt's and the cache hit."""
    out.token_ids = [ev.token_id]
    out.cached_tokens = ev.cached_tokens
    out.logprobs = None if ev.logprob is None else [ev.logprob]
    out.prompt_logprobs = ev.prompt_logprobs or None
    return out
