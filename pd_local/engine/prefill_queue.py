"""Which prompt tokens to prefill next (no tensors). `plan()` proposes chunks [start, end) within
a token budget, `advance()` records them; `admit(job)` may refuse a job's first chunk, which stops
the plan there. Policies: "fcfs"; "srpf", shortest remaining first, where a job that
`max_passed_tokens` younger tokens have passed goes before every younger one."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from pd_local.config import DEFAULT_MAX_PASSED_TOKENS, DEFAULT_PREFILL_POLICY, PREFILL_POLICIES


@dataclass(eq=False)
class PrefillJob:
    key: Hashable  # the caller's id (a request id)
    num_tokens: int  # tokens to prefill in all
    num_computed: int = 0  # tokens [0, num_computed) have their KV
    admitted: bool = False  # admit() said yes (the caller holds its resources)
    arrival: int = 0  # order of arrival (set by the queue); smaller is older
    passed: int = 0  # tokens of younger jobs scheduled while this one waited (aging)
    since: float = field(default_factory=time.monotonic)  # queued at (time.monotonic)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class Chunk:
    job: PrefillJob
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def is_last(self) -> bool:
        """This chunk completes the job: its last row is sampled (or handed over)."""
        return self.end == self.job.num_tokens


@dataclass
class PrefillQueue:
    """Jobs waiting for (more) prefill. budget: prompt tokens per plan; chunked=False never
    splits a job (a job longer than the budget then runs alone in its step)."""

    budget: int
    chunked: bool = True
    policy: str = DEFAULT_PREFILL_POLICY
    max_passed_tokens: int = DEFAULT_MAX_PASSED_TOKENS
    jobs: dict[Hashable, PrefillJob] = field(default_factory=dict)
    _arrivals: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise ValueError(f"prefill token budget must be > 0, got {self.budget}")
        if self.policy not in PREFILL_POLICIES:
            raise ValueError(f"prefill policy must be one of {PREFILL_POLICIES}, got {self.policy!r}")
        if self.max_passed_tokens < 0:
            raise ValueError(f"max_passed_tokens must be >= 0, got {self.max_passed_tokens}")

    def __len__(self) -> int:
        return len(self.jobs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.jobs

    def add(self, key: Hashable, num_tokens: int, arrival: int | None = None) -> PrefillJob:
        """Queue a job; `arrival` keeps an older stamp (a preempted job keeps its place)."""
        if key in self.jobs:
            raise ValueError(f"prefill job {key!r} is already queued")
        if num_tokens <= 0:
            raise ValueError(f"prefill job {key!r}: needs >= 1 token, got {num_tokens}")
        job = PrefillJob(key, num_tokens, arrival=next(self._arrivals) if arrival is None else arrival)
        self.jobs[key] = job
        return job

    def remove(self, key: Hashable) -> PrefillJob | None:
        """Drop a job (abort, preemption); None if it is not queued."""
        return self.jobs.pop(key, None)

    def num_unadmitted(self) -> int:
        return sum(not j.admitted for j in self.jobs.values())

    def order(self) -> list[PrefillJob]:
        """Jobs in the order the policy serves them."""
        jobs = sorted(self.jobs.values(), key=lambda j: j.arrival)
        if self.policy == "fcfs":
            return jobs
        starved = [j for j in jobs if j.passed >= self.max_passed_tokens]
        rest = sorted((j for j in jobs if j.passed < self.max_passed_tokens), key=lambda j: (j.remaining, j.arrival))
        return starved + rest

    def plan(self, admit: Callable[[PrefillJob], bool] | None = None, budget: int | None = None) -> list[Chunk]:
        """Chunks for one step, at most `budget` (default self.budget) tokens in all, except
        that with chunked=False a job longer than the budget runs alone."""
        left = self.budget if budget is None else budget
        chunks: list[Chunk] = []
        for job in self.order():
            if left <= 0:
                break
            if not self.chunked and chunks and job.remaining > left:
                break  # whole jobs only: this one waits for a step of its own
            if not job.admitted:
                if admit is not None and not admit(job):
                    break
                job.admitted = True  # admit may have moved num_computed on (a prefix-cache hit)
            n = min(job.remaining, left) if self.chunked else job.remaining
            chunks.append(Chunk(job, job.num_computed, job.num_computed + n))
            left -= n
        return chunks

    def advance(self, chunks: list[Chunk]) -> list[PrefillJob]:
        """The chunks ran: move each job forward, age the older jobs they passed, and remove and
        return the jobs now complete."""
        done: list[PrefillJob] = []
        for c in chunks:
            if c.job.num_computed != c.start:
                raise ValueError(f"prefill job {c.job.key!r}: chunk starts at {c.start}, "
                                 f"{c.job.num_computed} tokens computed")
            c.job.num_computed = c.end
            for other in self.jobs.values():
                if other.arrival < c.job.arrival:
                    other.passed += c.num_tokens
            if c.is_last:
                done.append(self.jobs.pop(c.job.key))
        return done
