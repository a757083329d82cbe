"""The measuring half of the study: start the servers, run the schedules, record CPU use.

Everything here talks to live `pd-local serve` processes; nothing here analyses.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

import servers  # benchmarks/servers.py (pd_vs_colocated.py puts benchmarks/ on sys.path)
from pd_local.loadtest.client import RequestOptions
from pd_local.loadtest.runner import RunOptions, RunResult, fetch_model, run_benchmark
from pd_local.loadtest.workloads import (KIND_LONG, KIND_SHORT, Scheduled, long_spec, make_schedule,
                                         random_spec)
from study.settings import Run, Settings, TOPOLOGIES, say


def start_server(name: str, st: Settings, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`pd-local serve` for topology `name` in its own process group; returns once healthy."""
    # The engine's own prefill budget (engine.max_prefill_tokens, 256 by default) and chunked
    # prefill: the colocated baseline is the chunked one vLLM and SGLang would give (before
    # chunked prefill the budget was raised to the whole prompt so a long prompt ran at once).
    flags = [*TOPOLOGIES[name], "--dtype", st.dtype, "--set", f"engine.max_model_len={st.max_model_len}"]
    if st.model:
        flags += ["--model", st.model]
    return servers.start_server(name, flags, log_dir / f"pd_vs_colocated_{name}.log")


stop_server = servers.stop_server


# ---- CPU accounting: who used the two cores during a run ---------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system seconds) of a live process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _label(pid: int) -> str:
    """`rank0`, `rank1`, ... from a torchrun worker's environment, else the process name."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        for item in env:
            if item.startswith(b"RANK="):
                return "rank" + item[5:].decode()
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


@dataclass(frozen=True)
class CpuSnapshot:
    t: float
    busy: float  # seconds of non-idle CPU time on the whole machine (/proc/stat)
    ours: dict[str, float]  # seconds of CPU per process of the loaded server, and "client"
    idle: float  # seconds of CPU of the other (idle) servers' processes


def _tree(root: int, stats: dict[int, tuple[int, float]]) -> set[int]:
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        tree.add(pid)
        frontier += [c for c, (pp, _) in stats.items() if pp == pid and c not in tree]
    return tree & set(stats)


def cpu_snapshot(server_pid: int, idle_pids: Sequence[int] = ()) -> CpuSnapshot:
    """Machine-wide busy time; the CPU time of this process (the load-test client) and of every
    descendant of `server_pid` (torchrun and its ranks); and that of the servers `idle_pids`."""
    line = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in line]
    busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # all but idle and iowait
    procs: dict[int, tuple[int, float]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _proc_stat(int(d.name))
            if st is not None:
                procs[int(d.name)] = st
    ours = {_label(pid): procs[pid][1] for pid in _tree(server_pid, procs)}
    idle = sum(procs[pid][1] for root in idle_pids for pid in _tree(root, procs))
    self_stat = _proc_stat(os.getpid())
    ours["client"] = self_stat[1] if self_stat else 0.0
    return CpuSnapshot(time.monotonic(), busy, ours, idle)


def cpu_use(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    """Average cores used between two snapshots: per process of ours (`rank0`.., `client`) and
    their sum `ours`; `idle_servers`; `others` (everything else on the machine: other people's
    tests, the kernel); `machine` (all)."""
    dt = max(b.t - a.t, 1e-9)
    use = {k: (b.ours[k] - a.ours.get(k, 0.0)) / dt for k in b.ours}
    use["ours"] = sum(use.values())
    use["idle_servers"] = max(0.0, (b.idle - a.idle) / dt)
    use["machine"] = (b.busy - a.busy) / dt
    use["others"] = max(0.0, use["machine"] - use["ours"] - use["idle_servers"])
    return {k: round(v, 3) for k, v in sorted(use.items())}


# ---- runs ---------------------------------------------------------------------------------------

def run_schedule(url: str, model: str, st: Settings, schedule: list[Scheduled],
                 max_concurrency: int | None = None) -> RunResult:
    opts = RunOptions(request=RequestOptions(url=url + "/v1/chat/completions", model=model,
                                             chat=True, api_key=None, ignore_eos=True,
                                             timeout=st.timeout, extra_body={}),
                      max_concurrency=max_concurrency)
    return asyncio.run(run_benchmark(schedule, opts))


def sequential(kind: str, n: int, st: Settings, seed: int) -> list[Scheduled]:
    """`n` requests of one kind, all due at 0: with max_concurrency=1 they go one at a time."""
    rng = np.random.default_rng([seed, 7])
    wl = st.workload()
    specs = [long_spec(rng, wl) if kind == KIND_LONG else random_spec(rng, wl, KIND_SHORT)
             for _ in range(n)]
    return [Scheduled(0.0, s.for_endpoint(True)) for s in specs]


def interference_schedule(st: Settings, rate: float, duration: float, longs: bool
                          ) -> list[Scheduled]:
    """The bench tool's interference workload; without longs, the same shorts at the same
    times (the schedule with its long prompts removed), so that baseline and interference
    differ only by the long prompts."""
    items = list(make_schedule(st.workload(), rate, 1.0, None, duration, st.seed, True))
    return items if longs else [it for it in items if it.spec.kind != KIND_LONG]


def ok_count(run: RunResult) -> str:
    bad = sum(not r.success for r in run.results)
    return f"{len(run.results) - bad}/{len(run.results)} ok, {run.duration:.1f} s"


@dataclass
class Server:
    """A topology's server while it is up."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    model: str


@dataclass(frozen=True)
class Step:
    topology: str
    phase: str  # calibration-short | calibration-long | baseline | interference | sweep
    rate: float | None = None


def plan(st: Settings, topologies: list[str], one_at_a_time: bool) -> list[Step]:
    """The runs in order. Interleaved (default): each phase for every topology before the next
    phase, the topology order reversed each time (A B, B A, A B, ...), so a drift of the shared
    host (other processes starting, thermal state) hits both alike. One at a time: all of the
    first topology's runs, then the second's."""
    phases: list[tuple[str, float | None]] = [("calibration-short", None),
                                              ("calibration-long", None),
                                              ("baseline", st.rate), ("interference", st.rate)]
    phases += [("sweep", r) for r in st.sweep_rates]
    if one_at_a_time:
        return [Step(t, ph, r) for t in topologies for ph, r in phases]
    steps, order = [], list(topologies)
    for ph, r in phases:
        steps += [Step(t, ph, r) for t in order]
        order.reverse()
    return steps


def schedule_for(step: Step, st: Settings) -> tuple[list[Scheduled], int | None]:
    """(requests, max_concurrency) of a step."""
    if step.phase.startswith("calibration-"):
        kind = step.phase.split("-", 1)[1]
        return sequential(kind, st.calib_repeats, st, st.seed), 1
    assert step.rate is not None
    if step.phase == "sweep":
        return interference_schedule(st, step.rate, st.sweep_duration, True), None
    return interference_schedule(st, step.rate, st.duration, step.phase == "interference"), None


def bring_up(name: str, st: Settings, log_dir: Path) -> Server:
    say(f"{name}: starting the server (log: {log_dir / f'pd_vs_colocated_{name}.log'})")
    t0 = time.monotonic()
    proc, url = start_server(name, st, log_dir)
    try:
        model = asyncio.run(fetch_model(url, None, 30.0))
        say(f"{name}: healthy after {time.monotonic() - t0:.0f} s; warming up")
        # Untimed: first-call allocations and kernels, the long-prompt path, connections.
        run_schedule(url, model, st, sequential(KIND_SHORT, 2, st, 99)
                     + sequential(KIND_LONG, 1, st, 99), max_concurrency=1)
    except BaseException:
        stop_server(proc)
        raise
    return Server(name, proc, url, model)


def describe(step: Step, st: Settings) -> str:
    if step.phase == "sweep":
        return (f"sweep, {step.rate:g} short/s + a long every {st.long_every:g} s for "
                f"{st.sweep_duration:g} s")
    if step.phase in ("baseline", "interference"):
        return f"{step.phase}, {step.rate:g} short/s for {st.duration:g} s"
    return f"{step.phase}, {st.calib_repeats} requests one at a time"


def machine_busy_cores(seconds: float) -> float:
    """Average cores in use on the whole machine over the next `seconds`."""
    a = cpu_snapshot(-1)
    time.sleep(seconds)
    b = cpu_snapshot(-1)
    return (b.busy - a.busy) / (b.t - a.t)


def wait_for_quiet(limit_s: float, threshold: float = 0.3) -> float:
    """Wait up to `limit_s` for a 10 s window in which the machine uses under `threshold`
    cores (other people's tests share it); returns the last window's load."""
    deadline = time.monotonic() + limit_s
    while True:
        busy = machine_busy_cores(10.0)
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        say(f"the machine is busy ({busy:.2f} cores in use by others); waiting for quiet")


def run_study(st: Settings, topologies: list[str], log_dir: Path, one_at_a_time: bool
              ) -> list[Run]:
    """Every step of `plan`; servers are started when first needed and stopped at the end
    (one at a time: before the next topology's first step)."""
    steps = plan(st, topologies, one_at_a_time)
    servers: dict[str, Server] = {}
    saturated: set[str] = set()
    runs: list[Run] = []
    try:
        # The bar shows on a terminal only; say() writes above it (tqdm.write).
        for i, step in enumerate(tqdm(steps, desc="study", unit="step", disable=None), 1):
            if step.phase == "sweep" and step.topology in saturated:
                continue
            if step.topology not in servers:
                if one_at_a_time:
                    for other in list(servers):
                        say(f"{other}: stopping the server")
                        stop_server(servers.pop(other).proc)
                servers[step.topology] = bring_up(step.topology, st, log_dir)
            srv = servers[step.topology]
            idle = [s.proc.pid for s in servers.values() if s is not srv]
            say(f"[{i}/{len(steps)}] {srv.name}: {describe(step, st)}")
            schedule, conc = schedule_for(step, st)
            before = cpu_snapshot(srv.proc.pid, idle)
            r = run_schedule(srv.url, srv.model, st, schedule, conc)
            cpu = cpu_use(before, cpu_snapshot(srv.proc.pid, idle))
            runs.append(Run(srv.name, step.phase, step.rate, r, cpu))
            shorts = [x for x in r.results if x.kind == KIND_SHORT and x.success]
            p50 = float(np.median([x.ttft for x in shorts])) if shorts else math.inf
            longs = [x.ttft for x in r.results if x.kind == KIND_LONG and x.success]
            ttfts = ([f"short {1000 * p50:.0f} ms"] if shorts else []) + (
                [f"long {1000 * float(np.median(longs)):.0f} ms"] if longs else [])
            say(f"[{i}/{len(steps)}] {srv.name}: {ok_count(r)}; median TTFT "
                + ", ".join(ttfts)
                + f"; cores: ours {cpu['ours']:.2f}, idle server {cpu['idle_servers']:.2f}, "
                f"others {cpu['others']:.2f}")
            if step.phase == "sweep" and p50 > 10.0:
                say(f"{srv.name}: saturated (median TTFT > 10 s); skipping its higher rates")
                saturated.add(srv.name)
    finally:
        for s in servers.values():
            say(f"{s.name}: stopping the server")
            stop_server(s.proc)
    return runs


