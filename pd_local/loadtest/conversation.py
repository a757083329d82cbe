"""The multiturn workload: conversations whose turn k sends the whole history (system prompt,
earlier turns and their streamed answers) `think_time` after turn k-1's answer; a failed turn
ends its conversation. `per_turn` gives TTFT by turn (docs/loadtest.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pd_local.loadtest.client import RequestResult, send_request
from pd_local.loadtest.progress import ProgressBar
from pd_local.loadtest.runner import RunOptions, RunResult, make_client, run_benchmark
from pd_local.loadtest.workloads import (
    RequestSpec, WorkloadConfig, WorkloadError, arrival_offsets, random_words, spread,
    warmup_specs,
)

@dataclass(frozen=True)
class Conversation:
    """One conversation's fixed content: what the user will say (the answers come later)."""

    index: int
    system: str | None
    users: tuple[str, ...]  # one per turn
    user_lens: tuple[int, ...]  # word counts (~tokens) of `users`
    output_len: int


@dataclass(frozen=True)
class ScheduledConversation:
    offset: float  # start of turn 1, seconds after the timed run starts
    conversation: Conversation


def turn_messages(conv: Conversation, answers: Sequence[str], turn: int) -> list[dict[str, str]]:
    """The messages turn `turn` (1-based) sends: system?, (user, assistant) for each earlier
    turn with `answers[i]` the text streamed for turn i+1, then this turn's user message."""
    if not 1 <= turn <= len(conv.users):
        raise ValueError(f"turn {turn} outside 1..{len(conv.users)}")
    if len(answers) < turn - 1:
        raise ValueError(f"turn {turn} needs {turn - 1} earlier answers, got {len(answers)}")
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for i in range(turn - 1):
        msgs += [{"role": "user", "content": conv.users[i]},
                 {"role": "assistant", "content": answers[i]}]
    msgs.append({"role": "user", "content": conv.users[turn - 1]})
    return msgs


def turn_spec(conv: Conversation, answers: Sequence[str], turn: int) -> RequestSpec:
    """Turn `turn`'s request. `input_len` estimates the history in words (the server's usage
    replaces it): system + users so far + earlier answers' words."""
    msgs = turn_messages(conv, answers, turn)
    n_in = sum(len(m["content"].split()) for m in msgs)
    return RequestSpec(None, msgs, max(1, n_in), conv.output_len)


def make_conversations(cfg: WorkloadConfig, rate: float, burstiness: float, num: int | None,
                       duration: float | None, seed: int) -> Iterator[ScheduledConversation]:
    """Conversation starts and content, deterministic for a seed (the same for every target)."""
    if cfg.turns < 1:
        raise WorkloadError(f"--turns must be >= 1, got {cfg.turns}")
    rng_time = np.random.default_rng([seed, 0])
    rng_text = np.random.default_rng([seed, 1])
    shared = random_words(rng_text, cfg.system_len) if cfg.system_len and cfg.shared_system \
        else None
    for i, off in enumerate(arrival_offsets(rng_time, rate, burstiness, num, duration)):
        system = shared
        if cfg.system_len and not cfg.shared_system:
            system = random_words(rng_text, cfg.system_len)
        lens = tuple(spread(rng_text, cfg.input_len, cfg.range_ratio) for _ in range(cfg.turns))
        users = tuple(random_words(rng_text, n) for n in lens)
        yield ScheduledConversation(off, Conversation(i, system, users, lens, cfg.output_len))


async def run_conversations(schedule: Iterable[ScheduledConversation], opts: RunOptions,
                            think_time: float, progress: ProgressBar | None = None
                            ) -> RunResult:
    """Run each conversation's turns in order (module docstring); results in send order, each
    with `conversation` and `turn` set. Same RunResult as `runner.run_benchmark`."""
    results: list[RequestResult] = []
    sem = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
    async with make_client(opts) as client:
        started_at = dt.datetime.now().isoformat(timespec="seconds")
        t0 = time.perf_counter()

        async def one(conv: Conversation) -> None:
            answers: list[str] = []
            for turn in range(1, len(conv.users) + 1):
                if turn > 1:
                    await asyncio.sleep(think_time)
                spec = turn_spec(conv, answers, turn)
                if sem is not None:
                    await sem.acquire()
                try:
                    res = await send_request(client, opts.request, spec, len(results), t0)
                finally:
                    if sem is not None:
                        sem.release()
                res.conversation, res.turn = conv.index, turn
                results.append(res)
                if progress is not None:
                    progress.done(res.success)
                if not res.success:
                    return
                answers.append(res.text)

        tasks: list[asyncio.Task[None]] = []
        try:
            for item in schedule:
                delay = t0 + item.offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if opts.duration is not None and time.perf_counter() - t0 >= opts.duration:
                    break
                tasks.append(asyncio.create_task(one(item.conversation)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        duration = time.perf_counter() - t0
        if progress is not None:
            progress.close()
    results.sort(key=lambda r: r.start)
    for i, r in enumerate(results):
        r.index = i
    return RunResult(results, duration, started_at, t0)


async def run_multiturn(cfg: WorkloadConfig, opts: RunOptions, rate: float, burstiness: float,
                        num: int | None, duration: float | None, seed: int, warmup: int,
                        show_progress: bool) -> RunResult:
    """The CLI's multiturn run: `warmup` single-turn requests (untimed), then the conversations."""
    if warmup:
        await run_benchmark([], opts, warmup_specs(cfg, warmup, seed, True))
    progress = ProgressBar(None if num is None else num * cfg.turns, duration,
                           enabled=show_progress)
    convs = make_conversations(cfg, rate, burstiness, num, duration, seed)
    return await run_conversations(convs, opts, cfg.think_time, progress)


def per_turn(results: Sequence[RequestResult]) -> list[dict[str, Any]]:
    """TTFT by turn index over the results that have a turn: one entry per turn, in order, with
    `completed`, `failed`, `mean_input_len` (tokens when the server reported usage) and
    `mean/p50/p90_ttft_ms` (None without successes)."""
    turns = sorted({r.turn for r in results if r.turn is not None})
    out = []
    for k in turns:
        rs = [r for r in results if r.turn == k]
        ok = [r for r in rs if r.success and r.ttft is not None]
        ttft = np.asarray([r.ttft * 1000.0 for r in ok], dtype=np.float64)
        entry: dict[str, Any] = {
            "turn": k, "completed": len(ok), "failed": len(rs) - len(ok),
            "mean_input_len": float(np.mean([r.input_len for r in ok])) if ok else None,
            "mean_ttft_ms": float(ttft.mean()) if ok else None,
            "p50_ttft_ms": float(np.percentile(ttft, 50)) if ok else None,
            "p90_ttft_ms": float(np.percentile(ttft, 90)) if ok else None,
        }
        out.append(entry)
    return out
