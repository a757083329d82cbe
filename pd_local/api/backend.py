"""The contract between the HTTP front-end and what generates tokens: the router
(`cluster/router.py`, over torchrun ranks or, in one process, `cluster/local.py`). `submit`/`abort`
never block the asyncio loop; outputs reach each request's queue through `call_soon_threadsafe`,
and every request gets exactly one output with `finished=True`, after which nothing more."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol


from pd_local.engine.events import Load
from pd_local.engine.logprobs import Logprob
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import FinishReason

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
    load: Load = field(default_factory=Load)  # as the rank last reported it
    routed: int = 0  # requests the router sent to this rank, ever
    routed_prefix_tokens: int = 0  # of their prompt tokens, those the router expected cached
    queued_tokens: int = 0  # prefill: prompt tokens the router sent and saw neither done nor aborted
    prefilled_tokens: int = 0  # prompt tokens this rank computed (not cached), ever
    generated_tokens: int = 0  # tokens this rank sampled, ever
    threads: int = 0  # CPU threads it computes with, on these CPUs (engine/threads.py)
    cpus: str = ""
    mode: str = ""  # elastic: mixed, prefill or decode (cluster/modes.py)


FLIP_BUCKETS = (0.0, 0.05, 0.25, 1.0, 5.0, 30.0)  # seconds; to mixed/decode: 0 (the next placement)
MIGRATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Observed:
    """A histogram's counts per bucket (le each bound; the last: above them all) and sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def add(self, x: float) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)
        self.counts[next((i for i, b in enumerate(self.bounds) if x <= b), len(self.bounds))] += 1
        self.sum += x

    def copy(self) -> Observed:
        return Observed(self.bounds, list(self.counts), self.sum)


@dataclass
class BackendStats:
    ranks: list[RankStats] = field(default_factory=list)
    kv_bytes_transferred: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfers: int = 0
    migrations: int = 0  # running requests moved between elastic workers
    migration_bytes: int = 0
    flips: dict[str, int] = field(default_factory=dict)  # elastic ranks' mode changes, by new mode
    flip_seconds: dict[str, Observed] = field(default_factory=dict)  # by new mode: until in effect
    migration_seconds: Observed = field(default_factory=lambda: Observed(MIGRATION_BUCKETS))  # each stall
    mode_control: str = ""  # elastic: "policy" (cluster/modes.py) or "operator" (POST /v1/cluster/mode)
    demand: dict[str, float] = field(default_factory=dict)  # elastic: busy ranks of prefill, of decode


class Backend(Protocol):
    max_model_len: int

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def submit(self, req_id: int, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue[RequestOutput]: ...

    def submit_n(self, req_ids: list[int], prompt_ids: list[int],
                 params: SamplingParams) -> list[asyncio.Queue[RequestOutput]]:
        """n choices of one prompt, prefilled once; choice i samples with seed + i."""
        ...

    def abort(self, req_id: int) -> None: ...

    def set_mode(self, rank: int, mode: str) -> Future[None]:
        """Pin an elastic rank's mode ("auto": the policy decides); done once applied, or failed
        with a ValueError that names the refusal."""
        ...

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
        span("migration", "migrate_start", "migrated")  # stopped on one rank -> decoding on another
        span("ttft", "queued", "first_token")
        span("total", "queued", "finished")
        return out
