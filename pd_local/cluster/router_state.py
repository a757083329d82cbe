"""What rank 0's router keeps per request and per rank (cluster/router.py owns and mutates it;
nothing here talks to a rank)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields

from pd_local.api.backend import RankStats, RequestOutput, Timeline
from pd_local.cluster.messages import TokenEntry
from pd_local.cluster.prefix_index import PrefixIndex
from pd_local.engine.logprobs import Logprob
from pd_local.engine.sampling import SamplingParams
from pd_local.engine.scheduler import FinishReason


@dataclass
class RequestState:
    req_id: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    queue: asyncio.Queue[RequestOutput]
    decode: int
    timeline: Timeline = field(default_factory=Timeline)
    prefill: int | None = None
    local: bool = False  # prefilled on its decode rank (no KV crosses a link)
    prefill_done: bool = False
    first_token: bool = True
    hashes: list[bytes] = field(default_factory=list)  # full-block hashes ("prefix" routing)
    cached_tokens: int = 0  # prompt tokens its prefill rank did not compute (prefix cache)
    # sampling.prompt_logprobs: the prompt's, once here (colocated: with the first token; PD:
    # PromptLogprobs from the prefill rank, which may come after the decode rank's tokens:
    # outputs wait in `held`, a normal finish in `deferred`, so the first output carries them)
    prompt_lps: tuple[Logprob, ...] | None = None
    lps_sent: bool = False
    held: list[RequestOutput] = field(default_factory=list)
    deferred: tuple[FinishReason, TokenEntry | None] | None = None
    generated: int = 0  # tokens delivered so far
    migrating_from: int | None = None  # its old decode rank while it moves (live migration)
    followers: list[int] = field(default_factory=list)  # n > 1: the other choices' ids
    leader: RequestState | None = None  # n > 1, another choice: the one it forks from

    @property
    def awaits_prompt_lps(self) -> bool:
        return self.sampling.prompt_logprobs is not None and self.prompt_lps is None


@dataclass
class RankState(RankStats):
    """What the router knows of one worker: what /metrics shows, and its own bookkeeping."""

    unfinished: int = 0  # requests routed here and not finished (router's own count)
    max_model_len: int = 0
    ready: bool = False
    index: PrefixIndex = field(default_factory=PrefixIndex)  # "prefix" routing only

    def snapshot(self) -> RankStats:
        return RankStats(**{f.name: getattr(self, f.name) for f in fields(RankStats)})


def with_token(out: RequestOutput, e: TokenEntry) -> RequestOutput:
    """out carrying e's token and its logprob."""
    out.token_ids = [e.token_id]
    out.logprobs = list(e.logprob) or None
    return out
