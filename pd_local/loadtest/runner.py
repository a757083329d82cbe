"""The asyncio driver: warm-up, then each scheduled request at its offset (or as soon as
`max_concurrency` allows) until the schedule ends or `duration` passes; then the in-flight ones
finish. `stream` requests are ended once every other request has finished."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import httpx

from pd_local.loadtest.client import RequestOptions, RequestResult, send_request
from pd_local.loadtest.progress import ProgressBar
from pd_local.loadtest.workloads import KIND_STREAM, RequestSpec, Scheduled

log = logging.getLogger(__name__)


class BenchError(RuntimeError):
    """The run cannot go on (e.g. every warm-up request failed); the message says why."""


@dataclass(frozen=True)
class RunOptions:
    request: RequestOptions
    max_concurrency: int | None = None
    duration: float | None = None
    watch_modes: bool = False  # sample the elastic ranks' modes from /v1/cluster (MODE_EVERY_S)


@dataclass
class RunResult:
    """Results in send order. `started_at`: wall-clock ISO time of the run's start;
    `start_monotonic`: the same instant on `time.perf_counter()` (CLOCK_MONOTONIC on Linux, so
    `start_monotonic + result.start` lines up with traces of a server on the same host)."""

    results: list[RequestResult]
    duration: float
    started_at: str
    start_monotonic: float
    modes: list[tuple[float, dict[str, str]]] = field(default_factory=list)  # (t, {rank: mode})


MODE_EVERY_S = 0.5


async def watch_modes(client: httpx.AsyncClient, opts: RunOptions, t0: float,
                      out: list[tuple[float, dict[str, str]]]) -> None:
    """Every MODE_EVERY_S: each elastic rank's mode (GET /v1/cluster); ends at once on a server
    without them (not elastic) or that does not answer."""
    url = httpx.URL(opts.request.url).copy_with(path="/v1/cluster", query=None)
    key = opts.request.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    while True:
        try:
            ranks = (await client.get(url, headers=headers)).raise_for_status().json()["ranks"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            log.warning("rank modes: %s from %s; not watched", type(e).__name__, url)
            return
        modes = {str(r["rank"]): r["mode"] for r in ranks if "mode" in r}
        if not modes:
            return
        out.append((round(time.perf_counter() - t0, 3), modes))
        await asyncio.sleep(MODE_EVERY_S)


def make_client(opts: RunOptions) -> httpx.AsyncClient:
    """One client per run. No connection cap unless `max_concurrency` (a pool cap would add
    queueing inside httpx to the measured TTFT); environment proxies are ignored so that the
    traffic goes to the server named, not through a proxy."""
    limits = httpx.Limits(max_connections=opts.max_concurrency,
                          max_keepalive_connections=opts.max_concurrency)
    return httpx.AsyncClient(timeout=httpx.Timeout(opts.request.timeout), limits=limits,
                             trust_env=False)


async def fetch_model(base_url: str, api_key: str | None, timeout: float) -> str:
    """The first model id from `GET {base_url}/v1/models`. Raises BenchError if unavailable."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            resp = await client.get(url, headers=headers)
            resp.raise_for_status()
            return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise BenchError(f"cannot list models at {url} ({type(e).__name__}: {reason}); "
                         "pass --model") from e


async def _warmup(client: httpx.AsyncClient, opts: RunOptions, specs: list[RequestSpec]) -> None:
    sem = asyncio.Semaphore(opts.max_concurrency or len(specs))

    async def one(i: int, spec: RequestSpec) -> RequestResult:
        async with sem:
            return await send_request(client, opts.request, spec, i, time.perf_counter())

    results = await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
    failed = [r for r in results if not r.success]
    if failed and len(failed) == len(results):
        raise BenchError(f"all {len(results)} warm-up requests failed; first error: "
                         f"{failed[0].error}")
    if failed:
        log.warning("%d of %d warm-up requests failed; first error: %s", len(failed),
                    len(results), failed[0].error)


async def run_benchmark(schedule: Iterable[Scheduled], opts: RunOptions,
                        warmup: list[RequestSpec] | None = None,
                        progress: ProgressBar | None = None) -> RunResult:
    """Warm up (results discarded), then run `schedule`; see the module contract."""
    async with make_client(opts) as client:
        if warmup:
            await _warmup(client, opts, warmup)
        sem = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
        tasks: list[asyncio.Task[RequestResult]] = []
        others: list[asyncio.Task[RequestResult]] = []  # every task but the open-ended streams
        stop_streams = asyncio.Event()

        async def one(spec: RequestSpec, index: int, t0: float) -> RequestResult:
            stop = stop_streams if spec.kind == KIND_STREAM else None
            try:
                res = await send_request(client, opts.request, spec, index, t0, stop)
            finally:
                if sem is not None:
                    sem.release()
            if progress is not None:
                progress.done(res.success)
            return res

        ticker: asyncio.Task[None] | None = None
        if progress is not None and progress.enabled:
            async def tick() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    progress.tick()
            ticker = asyncio.create_task(tick())

        started_at = dt.datetime.now().isoformat(timespec="seconds")
        t0 = time.perf_counter()
        modes: list[tuple[float, dict[str, str]]] = []
        watcher = asyncio.create_task(watch_modes(client, opts, t0, modes)) if opts.watch_modes else None
        try:
            for item in schedule:
                delay = t0 + item.offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if sem is not None:
                    await sem.acquire()
                if opts.duration is not None and time.perf_counter() - t0 >= opts.duration:
                    if sem is not None:
                        sem.release()
                    break
                tasks.append(asyncio.create_task(one(item.spec, len(tasks), t0)))
                if item.spec.kind != KIND_STREAM:
                    others.append(tasks[-1])
            await asyncio.gather(*others)
            stop_streams.set()
            results = list(await asyncio.gather(*tasks))
        finally:
            for bg in (ticker, watcher):
                if bg is not None:
                    bg.cancel()
            for task in tasks:
                task.cancel()
        duration = time.perf_counter() - t0
        if progress is not None:
            progress.close()
    return RunResult(results, duration, started_at, t0, modes)
