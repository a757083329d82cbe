"""The study: 1P1D vs colocated-2 on the same worker cores, same model, same requests.

Starts each topology with `pd-local serve` on a free loopback port and drives it with the
`pd_local.loadtest` Python API (the code behind `pd-local bench`), one topology loaded at a
time. By default both servers stay up (an idle one uses ~0.02 cores) and the steps alternate
between them (A B, B A, ...) so that drift on a shared host hits both alike; `--one-at-a-time`
runs all of one topology, then the other, with only one server up. The steps:

1. calibration: short chats and long prompts sent one at a time (unloaded TTFT and TPOT);
2. baseline: steady short chats at `--rate` (Poisson) for `--duration` seconds;
3. interference: the same short chats at the same send times, plus a long prompt every
   `--long-every` seconds. Headline: p99 ITL of the short chats under interference / baseline
   (with p99.9, worst gap per stream and the share of streams with a gap > 500 ms beside it);
4. sweep: the interference mix at each of `--sweep-rates` (short-chat rate) for
   `--sweep-duration` seconds.

After the measurements the SLO is fixed from the calibration of both topologies (or `--slo`)
and applied to every recorded request: SLO attainment and goodput of the short chats per rate,
the highest rate meeting `--attainment` (DistServe's interpolation) and the ratio
1P1D/colocated-2, also for alternative SLOs and goals, each with a bootstrap band. The long
prompts are the interferer: the SLO is judged on the short chats; the long prompts' own
latencies are reported beside it. CPU use of every rank, the client, the idle server and the
rest of the machine is recorded per run.

Writes into `--out-dir`: study.json (everything summarised), runs/*.json (each run with its
per-request arrays, so `--reanalyse` can redo the analysis without measuring), results.md
(tables), PNGs (per topology: the bench tool's ttft/itl/timeline pictures of the interference
run and a zoom on one long prompt; stalls.png; itl_ccdf.png; sweep.png). Progress goes to
stderr, server logs to `--log-dir`.

    python benchmarks/pd_vs_colocated.py            # the full study, ~14 min on 2 CPU cores
    python benchmarks/pd_vs_colocated.py --quick    # smoke run, ~2.5 min, into /tmp
    python benchmarks/pd_vs_colocated.py --reanalyse docs/benchmarks --out-dir /tmp/x --slo tpot=90
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers  # noqa: E402  (benchmarks/servers.py)
from pd_local.loadtest.client import RequestOptions, RequestResult
from pd_local.loadtest.metrics import (capacity_ratio, is_good, max_rate_at_attainment,
                                       stats, summarize)
from pd_local.loadtest.report import result_json
from pd_local.loadtest.runner import RunOptions, RunResult, fetch_model, run_benchmark
from pd_local.loadtest.sweep import SweepCollector, Target, sweep_json, sweep_markdown
from pd_local.loadtest.workloads import (KIND_LONG, KIND_SHORT, Scheduled, WorkloadConfig,
                                         long_spec, make_schedule, random_spec)

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES: dict[str, list[str]] = {
    "1p1d": ["--prefill", "1", "--decode", "1"],
    "colocated-2": ["--colocated", "2"],
}
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
STALL_MS = 500.0  # a gap a reader notices as a hiccup
TEMPLATE_TOKENS = 64  # chat template + default system prompt, generously (SmolLM2: ~30)


def say(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    model: str | None
    dtype: str
    short_input: int
    short_output: int
    range_ratio: float
    long_input: int
    long_output: int
    long_every: float
    rate: float
    duration: float
    sweep_rates: tuple[float, ...]
    sweep_duration: float
    calib_repeats: int
    attainment: float
    ttft_factor: float
    tpot_factor: float
    slo: dict[str, float] | None
    seed: int
    timeout: float

    @property
    def max_model_len(self) -> int:
        need = max(self.long_input, self.short_input * 2) + self.long_output + TEMPLATE_TOKENS
        return max(2048, 1 << math.ceil(math.log2(need)))

    def workload(self) -> WorkloadConfig:
        return WorkloadConfig(name="interference", input_len=self.short_input,
                              output_len=self.short_output, range_ratio=self.range_ratio,
                              long_input_len=self.long_input, long_output_len=self.long_output,
                              long_every=self.long_every)


@dataclass(frozen=True)
class Cli:
    settings: Settings
    out: Path
    log_dir: Path
    topologies: list[str]
    one_at_a_time: bool
    wait_quiet: float
    reanalyse: Path | None = None


def parse_args(argv: Sequence[str]) -> Cli:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                epilog="\n\n".join(doc.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: short phases, small long prompt, 2 sweep rates, --out-dir "
                        "/tmp/pd_vs_colocated_quick unless given")
    p.add_argument("--out-dir", type=Path, help="default docs/benchmarks")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp"),
                   help="server logs: pd_vs_colocated_<topology>.log (default /tmp)")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help=f"comma list from {', '.join(TOPOLOGIES)} (default both)")
    p.add_argument("--model", help="model directory (default: the server's, SmolLM2-135M)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    g = p.add_argument_group("workload (lengths in tokens; chat template adds ~30)")
    g.add_argument("--short-input", type=int, default=64, help="short chat prompt (default 64)")
    g.add_argument("--short-output", type=int, default=96,
                   help="short chat max_tokens, with --ignore-eos (default 96)")
    g.add_argument("--range-ratio", type=float, default=0.33,
                   help="short lengths uniform in len*(1 +- r) (default 0.33: out 64..128)")
    g.add_argument("--long-input", type=int, default=1600, help="long prompt (default 1600)")
    g.add_argument("--long-output", type=int, default=16, help="long max_tokens (default 16)")
    g.add_argument("--long-every", type=float, default=10.0,
                   help="a long prompt every T seconds (default 10)")
    g.add_argument("--rate", type=float, default=1.0,
                   help="short chats per second, baseline and interference (default 1)")
    g.add_argument("--duration", type=float, default=60.0,
                   help="seconds of sending, baseline and interference each (default 60)")
    s = p.add_argument_group("sweep and SLO")
    s.add_argument("--sweep-rates", default="0.5,1,1.25,1.5,1.75,2,3",
                   help="short-chat rates of the sweep (default 0.5,1,1.25,1.5,1.75,2,3)")
    s.add_argument("--sweep-duration", type=float, default=30.0,
                   help="seconds of sending per sweep rate (default 30)")
    s.add_argument("--calib-repeats", type=int, default=5,
                   help="sequential requests per kind for the calibration (default 5)")
    s.add_argument("--attainment", type=float, default=0.9, help="goal (default 0.9)")
    s.add_argument("--ttft-factor", type=float, default=1.25,
                   help="TTFT bound = factor x the long prompt's unloaded TTFT, slower "
                        "topology (default 1.25)")
    s.add_argument("--tpot-factor", type=float, default=2.0,
                   help="TPOT bound = factor x the short chats' unloaded TPOT, slower "
                        "topology (default 2)")
    s.add_argument("--slo", help="fixed SLO instead, e.g. ttft=2500,tpot=60 (ms)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run all of one topology's steps, then the other's, with only one "
                        "server up (default: both up, idle one ~0.02 cores, steps alternate)")
    p.add_argument("--reanalyse", type=Path, metavar="DIR",
                   help="measure nothing: redo the analysis, tables and plots of the study in "
                        "DIR (its study.json and runs/) into --out-dir (default DIR), with this "
                        "command's SLO options (--slo, --ttft-factor, --tpot-factor, "
                        "--attainment)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for the machine to be idle (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="per request (default 120 s)")
    a = p.parse_args(argv)
    topologies = [t.strip() for t in a.topologies.split(",") if t.strip()]
    bad = [t for t in topologies if t not in TOPOLOGIES]
    if bad or not topologies:
        p.error(f"--topologies: unknown {bad}; choose from {list(TOPOLOGIES)}")
    slo = None
    if a.slo:
        from pd_local.loadtest.metrics import parse_slo
        try:
            slo = parse_slo(a.slo)
        except ValueError as e:
            p.error(f"--slo: {e}")
    rates = tuple(sorted({float(x) for x in a.sweep_rates.split(",") if x.strip()}))
    st = Settings(a.model, a.dtype, a.short_input, a.short_output, a.range_ratio, a.long_input,
                  a.long_output, a.long_every, a.rate, a.duration, rates, a.sweep_duration,
                  a.calib_repeats, a.attainment, a.ttft_factor, a.tpot_factor, slo, a.seed,
                  a.timeout)
    out = a.out_dir
    if a.quick:
        st = replace(st, long_input=min(st.long_input, 600), long_every=4.0,
                     duration=min(st.duration, 12.0), sweep_rates=(1.0, 3.0),
                     sweep_duration=min(st.sweep_duration, 8.0),
                     calib_repeats=min(st.calib_repeats, 2))
        out = out or Path("/tmp/pd_vs_colocated_quick")
    return Cli(st, out or a.reanalyse or REPO / "docs" / "benchmarks", a.log_dir, topologies,
               a.one_at_a_time, a.wait_quiet, a.reanalyse)


# ---- servers ------------------------------------------------------------------------------------

def start_server(name: str, st: Settings, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`pd-local serve` for topology `name` in its own process group; returns once healthy."""
    n = st.max_model_len
    flags = [*TOPOLOGIES[name], "--dtype", st.dtype, "--set", f"engine.max_model_len={n}",
             "--set", f"engine.max_prefill_tokens={n}"]
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

@dataclass
class Run:
    """One load-test run of one topology, kept in memory so that the SLO can be applied later."""

    topology: str
    phase: str  # calibration-short | calibration-long | baseline | interference | sweep
    rate: float | None
    run: RunResult
    cpu: dict[str, float]  # average cores used during the run (cpu_use)


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
        for i, step in enumerate(steps, 1):
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


# ---- analysis -----------------------------------------------------------------------------------

def of_kind(run: RunResult, kind: str) -> list[RequestResult]:
    return [r for r in run.results if r.kind == kind]


def ms_stats(values: Sequence[float]) -> dict[str, float | None]:
    out = stats([1000 * v for v in values], PERCENTILES)
    out["max"] = 1000 * max(values) if values else None
    out["n"] = len(values)
    return out


def latency(results: Sequence[RequestResult]) -> dict[str, Any]:
    """Latency statistics (ms) of `results`, including each stream's worst gap: one stall of
    2 s in a 96-token stream is 1% of its gaps, so the pooled ITL p99 can miss what a reader
    sees; `stalled_streams` is the share of streams with a gap over STALL_MS."""
    ok = [r for r in results if r.success]
    worst = [max(r.itl) for r in ok if r.itl]
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "stream_max_itl_ms": ms_stats(worst),
        "stalled_streams": sum(w * 1000 > STALL_MS for w in worst) / len(worst) if worst else None,
        "ttft_ms": ms_stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": ms_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": ms_stats([g for r in ok for g in r.itl]),
        "server_timings_ms": {
            k: stats([r.server_timings[k] for r in ok if k in r.server_timings], (50.0, 90.0))
            for k in sorted({k for r in ok for k in r.server_timings})},
    }


def ceil_to(x: float, step: int) -> int:
    """`x` rounded up to a multiple of `step`; within 1 ppm of a multiple counts as on it."""
    return step * math.ceil(x / step - 1e-6)


def calibrate_slo(runs: list[Run], st: Settings) -> tuple[dict[str, float], dict[str, Any]]:
    """TTFT bound: `ttft_factor` x the slower topology's median unloaded TTFT of a long prompt
    (rounded up to 100 ms); TPOT bound: `tpot_factor` x the slower median unloaded TPOT of a
    short chat (rounded up to 5 ms). Returns (slo_ms, the measured inputs)."""
    unloaded: dict[str, dict[str, float]] = {}
    for r in runs:
        if r.phase.startswith("calibration-"):
            kind = r.phase.split("-", 1)[1]
            ok = [x for x in r.run.results if x.success]
            u = unloaded.setdefault(r.topology, {})
            u[f"{kind}_ttft_ms"] = 1000 * float(np.median([x.ttft for x in ok]))
            tpots = [x.tpot for x in ok if x.tpot is not None]
            u[f"{kind}_tpot_ms"] = 1000 * float(np.median(tpots)) if tpots else math.nan
    if st.slo is not None:
        return dict(st.slo), unloaded
    long_ttft = max(u["long_ttft_ms"] for u in unloaded.values())
    short_tpot = max(u["short_tpot_ms"] for u in unloaded.values())
    slo = {"ttft": ceil_to(st.ttft_factor * long_ttft, 100),
           "tpot": ceil_to(st.tpot_factor * short_tpot, 5)}
    return slo, unloaded


def meets(x: RequestResult, slo: dict[str, float], max_gap_ms: float | None) -> bool:
    """The bench tool's SLO test, plus (when given) no gap between tokens over `max_gap_ms`."""
    if not is_good(x, slo):
        return False
    return max_gap_ms is None or not x.itl or 1000 * max(x.itl) <= max_gap_ms


def sweep_for(runs: list[Run], topologies: list[str], slo: dict[str, float], st: Settings,
              max_gap_ms: float | None = None) -> dict[str, Any]:
    """The bench tool's sweep JSON, with attainment/goodput/latencies of the short chats."""
    targets = [Target(t, t) for t in topologies]
    col = SweepCollector(targets, list(st.sweep_rates), st.attainment, slo)
    extra: dict[tuple[str, float], dict[str, Any]] = {}
    for r in runs:
        if r.phase != "sweep":
            continue
        rate = float(r.rate or 0)
        summary = summarize(r.run.results, r.run.duration, slo)
        shorts = of_kind(r.run, KIND_SHORT)
        good = sum(meets(x, slo, max_gap_ms) for x in shorts)
        row = {**summary, **summary.get("per_kind", {}).get(KIND_SHORT, {}),
               "slo_attainment": good / len(shorts) if shorts else None,
               "request_goodput": good / r.run.duration}
        col.add(Target(r.topology, r.topology), rate, row, run_file(r))
        longs = [x.ttft for x in of_kind(r.run, KIND_LONG) if x.success and x.ttft is not None]
        extra[(r.topology, rate)] = {
            "all_requests_slo_attainment": summary["slo_attainment"],
            "short_requests": len(shorts),
            "long_median_ttft_ms": 1000 * float(np.median(longs)) if longs else None,
            "others_cpu_cores": r.cpu.get("others")}
    data = sweep_json(col)
    for t, tgt in data["targets"].items():
        for row in tgt["runs"]:
            row.update(extra[(t, row["request_rate"])])
    return data


def bootstrap_ratio(runs: list[Run], topologies: list[str], slo: dict[str, float],
                    max_gap_ms: float | None, goal: float, n: int = 1000, seed: int = 0
                    ) -> dict[str, Any]:
    """How much the capacity ratio moves with the luck of which requests a 30-s run got:
    resample each sweep run's short chats (with replacement, same count), recompute every
    attainment, both capacities and their ratio. Returns the 5/50/95th percentiles of the
    defined ratios and how many resamples had no defined ratio (a side missed the goal at every
    rate) or a censored one (a side met it at every rate)."""
    rng = np.random.default_rng(seed)
    good = {t: {} for t in topologies[:2]}
    for r in runs:
        if r.phase == "sweep" and r.topology in good:
            good[r.topology][float(r.rate or 0)] = np.array(
                [meets(x, slo, max_gap_ms) for x in of_kind(r.run, KIND_SHORT)], dtype=float)
    a, b = topologies[:2]
    values, undefined, censored = [], 0, 0
    for _ in range(n):
        caps = {}
        for t in (a, b):
            pts = [(rate, float(g[rng.integers(0, g.size, g.size)].mean()) if g.size else None)
                   for rate, g in sorted(good[t].items())]
            caps[t] = max_rate_at_attainment(pts, goal)
        ratio = capacity_ratio(a, caps[a], b, caps[b])
        if ratio.value is None:
            undefined += 1
        else:
            censored += ratio.bound != "="
            values.append(ratio.value)
    pct = [float(x) for x in np.percentile(values, [5, 50, 95])] if values else [None] * 3
    return {"resamples": n, "p5": pct[0], "p50": pct[1], "p95": pct[2],
            "undefined": undefined, "censored": censored}


def sensitivity(runs: list[Run], topologies: list[str], slo: dict[str, float],
                unloaded: dict[str, dict[str, float]], st: Settings) -> list[dict[str, Any]]:
    """The goodput ratio under alternative SLOs and attainment goals (same runs), each with a
    bootstrap interval, so that the choice and the noise can be judged."""
    short_ttft = max(u["short_ttft_ms"] for u in unloaded.values())
    goal = st.attainment
    variants: list[tuple[str, dict[str, float], float | None, float]] = [
        ("chosen", slo, None, goal)]
    if "tpot" in slo and len(slo) > 1:
        variants.append(("TPOT only", {"tpot": slo["tpot"]}, None, goal))
    if "ttft" in slo and len(slo) > 1:
        variants.append(("TTFT only", {"ttft": slo["ttft"]}, None, goal))
    if "tpot" in slo:
        variants += [("tighter TPOT (x0.75)", {**slo, "tpot": 0.75 * slo["tpot"]}, None, goal),
                     ("looser TPOT (x1.5)", {**slo, "tpot": 1.5 * slo["tpot"]}, None, goal)]
    variants += [
        ("chat TTFT 1 s", {**slo, "ttft": 1000.0}, None, goal),
        ("chat TTFT (5 x unloaded short)", {**slo, "ttft": 5 * short_ttft}, None, goal),
        (f"chosen + no gap > {STALL_MS:.0f} ms (not a bench SLO)", slo, STALL_MS, goal),
        (f"chosen, goal {100 * (goal - 0.05):g}%", slo, None, goal - 0.05),
        (f"chosen, goal {100 * min(goal + 0.05, 1.0):g}%", slo, None, min(goal + 0.05, 1.0)),
    ]
    out = []
    for label, v, gap, g in variants:
        data = sweep_for(runs, topologies, v, replace(st, attainment=g), gap)
        caps = {t: (data["targets"][t]["max_rate_at_attainment"],
                    data["targets"][t]["max_rate_status"]) for t in data["targets"]}
        ratio = data["goodput_ratios"][0] if data["goodput_ratios"] else None
        out.append({"label": label, "slo_ms": v, "max_gap_ms": gap, "attainment_goal": g,
                    "capacity": caps, "ratio": ratio,
                    "bootstrap": bootstrap_ratio(runs, topologies, v, gap, g, seed=st.seed)})
    return out


def run_file(r: Run) -> str:
    tag = f"_rate{r.rate:g}" if r.phase == "sweep" else ""
    return f"runs/{r.topology}_{r.phase}{tag}.json"


def rounded(x: Any) -> Any:
    """Floats to 6 significant digits, recursively (microseconds for times in seconds)."""
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def write_compact(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rounded(obj), separators=(",", ":"), allow_nan=False) + "\n")


def provenance() -> dict[str, Any]:
    """When and on what code the measurement ran (the servers import pd_local from REPO)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "git_commit": git("rev-parse",
                                                                                   "HEAD"),
            "pd_local_uncommitted_changes": git("status", "--porcelain", "--", "pd_local") != "",
            "cpu_count": os.cpu_count()}


def analyse(runs: list[Run], topologies: list[str], st: Settings, out: Path,
            origin: dict[str, Any] | None = None) -> dict[str, Any]:
    slo, unloaded = calibrate_slo(runs, st)
    by = {(r.topology, r.phase): r for r in runs if r.phase != "sweep"}
    inter: dict[str, Any] = {}
    for t in topologies:
        base, itf = by[(t, "baseline")].run, by[(t, "interference")].run
        b, i = latency(base.results), latency(of_kind(itf, KIND_SHORT))
        lg = latency(of_kind(itf, KIND_LONG))
        inter[t] = {
            "baseline_short": b, "interference_short": i, "interference_long": lg,
            "itl_p99_ratio": (i["itl_ms"]["p99"] or math.nan) / (b["itl_ms"]["p99"] or math.nan),
            "itl_p99.9_ratio": (i["itl_ms"]["p99.9"] or math.nan)
            / (b["itl_ms"]["p99.9"] or math.nan),
            "ttft_p99_ratio": (i["ttft_ms"]["p99"] or math.nan) / (b["ttft_ms"]["p99"] or math.nan),
            "stream_max_itl_p90_ratio": (i["stream_max_itl_ms"]["p90"] or math.nan)
            / (b["stream_max_itl_ms"]["p90"] or math.nan),
        }
    sweep = sweep_for(runs, topologies, slo, st)
    result = {
        "provenance": origin or {},
        "settings": {**asdict(st), "max_model_len": st.max_model_len},
        "topologies": {t: TOPOLOGIES[t] for t in topologies},
        "unloaded_ms": unloaded, "slo_ms": slo,
        "slo_rule": None if st.slo else
        f"ttft = {st.ttft_factor} x slower unloaded long-prompt TTFT (ceil 100 ms); "
        f"tpot = {st.tpot_factor} x slower unloaded short-chat TPOT (ceil 5 ms)",
        "interference": inter, "sweep": sweep,
        "sensitivity": sensitivity(runs, topologies, slo, unloaded, st) if len(topologies) > 1
        else [],
        "cpu_cores_used": {f"{r.topology} {r.phase}" + (f" {r.rate:g}/s" if r.phase == "sweep"
                                                         else ""): r.cpu for r in runs},
        "run_files": [run_file(r) for r in runs],
    }
    for r in runs:
        meta = {"topology": r.topology, "phase": r.phase, "request_rate": r.rate,
                "cpu_cores_used": r.cpu}
        write_compact(out / run_file(r),
                      result_json(meta, summarize(r.run.results, r.run.duration, slo,
                                                  PERCENTILES), r.run, detailed=True))
    (out / "study.json").write_text(json.dumps(rounded(result), indent=1) + "\n")
    return result


def load_runs(src: Path) -> tuple[Settings, list[str], list[Run], dict[str, Any]]:
    """The runs of an earlier study from its study.json and runs/*.json (per-request arrays),
    so that the analysis can be redone (another SLO, other pictures) without measuring."""
    study = json.loads((src / "study.json").read_text())
    saved = {k: v for k, v in study["settings"].items() if k != "max_model_len"}
    saved["sweep_rates"] = tuple(saved["sweep_rates"])
    st = Settings(**saved)
    runs = []
    for name in study["run_files"]:
        d = json.loads((src / name).read_text())
        results = []
        for i, kind in enumerate(d["kinds"]):
            ok = d["errors"][i] == ""
            results.append(RequestResult(
                index=i, kind=kind, input_len=d["input_lens"][i],
                requested_output_len=d["output_lens"][i], start=d["start_times"][i],
                success=ok, error=d["errors"][i], ttft=d["ttfts"][i], e2el=d["e2els"][i],
                output_tokens=d["output_lens"][i], chunk_times=d["chunk_times"][i],
                chunk_tokens=d["chunk_tokens"][i], itl=d["itls"][i],
                server_timings=d["pd_local_timings_by_request"][i]))
        run = RunResult(results, d["duration"], d["date"], d["start_monotonic"])
        runs.append(Run(d["topology"], d["phase"], d["request_rate"], run, d["cpu_cores_used"]))
    return st, list(study["topologies"]), runs, study.get("provenance", {})


# ---- pictures and tables ------------------------------------------------------------------------

def plots(runs: list[Run], result: dict[str, Any], out: Path) -> list[Path]:
    from pd_local.loadtest.plots import plot_run, plot_sweep, require_matplotlib

    plt = require_matplotlib()
    paths: list[Path] = []
    topologies = list(result["interference"])
    for t in topologies:
        run = next(r.run for r in runs if r.topology == t and r.phase == "interference")
        paths += plot_run(run, out / f"{t}-interference")
        # A zoom on the second long prompt (the first may still meet a cold cache or allocator).
        longs = [r for r in of_kind(run, KIND_LONG) if r.success]
        if longs:
            lg = longs[min(1, len(longs) - 1)]
            lo, hi = lg.start - 3.0, lg.start + (lg.e2el or 0) + 3.0
            sub = [r for r in run.results if lo <= r.start <= hi or
                   (r.start < lo and r.start + (r.e2el or 0) > lo)]
            zoom = RunResult(sub, run.duration, run.started_at, run.start_monotonic)
            zdir = out / f"{t}-interference" / "zoom"
            for p in plot_run(zoom, zdir):
                if p.name == "timeline.png":
                    target = out / f"{t}-interference" / "timeline_zoom.png"
                    p.replace(target)
                    paths.append(target)
                else:
                    p.unlink()
            zdir.rmdir()
    paths.append(stall_figure(plt, runs, topologies, out / "stalls.png"))
    # ITL CDF of the short chats, baseline vs interference, both topologies on one axis.
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"1p1d": "tab:blue", "colocated-2": "tab:orange"}
    for t in topologies:
        for phase, style in (("baseline", ":"), ("interference", "-")):
            run = next(r.run for r in runs if r.topology == t and r.phase == phase)
            gaps = np.sort([1000 * g for r in of_kind(run, KIND_SHORT) if r.success
                            for g in r.itl])
            if gaps.size == 0:
                continue
            p99 = float(np.percentile(gaps, 99))
            ax.step(np.maximum(gaps, 1.0), 1 - np.arange(gaps.size) / gaps.size, where="post",
                    linestyle=style, color=colors.get(t), label=f"{t} {phase} (p99 {p99:.0f} ms)")
    for q, name in ((0.01, "p99"), (0.001, "p99.9")):
        ax.axhline(q, color="gray", linewidth=0.8, linestyle="--")
        ax.annotate(name, (10.5, q), textcoords="offset points", xytext=(0, 3), fontsize=8,
                    color="gray")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(left=10.0)
    ax.set_xlabel("inter-token latency of the short chats (ms)")
    ax.set_ylabel("fraction of gaps > x")
    ax.set_title("ITL tail: steady short chats, without (dotted) and with (solid) long prompts")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    path = out / "itl_ccdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    paths.append(plot_sweep(result["sweep"], out / "sweep.png"))
    return paths


def stall_figure(plt: Any, runs: list[Run], topologies: list[str], path: Path) -> Path:
    """The interference runs around their second long prompt, one panel per topology on a
    shared y axis (the bench tool's timeline scales each run to its own largest gap). The
    schedules are identical, so both panels show the same requests."""
    fig, axes = plt.subplots(len(topologies), 1, figsize=(12, 3.2 * len(topologies)),
                             sharex=True, sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, t in zip(axes[:, 0], topologies):
        run = next(r.run for r in runs if r.topology == t and r.phase == "interference")
        longs = [r for r in of_kind(run, KIND_LONG) if r.success]
        if not longs:
            continue
        lg = longs[min(1, len(longs) - 1)]
        lo, hi = lg.start - 3.0, lg.start + (lg.e2el or 0) + 3.0
        for i, r in enumerate(x for x in of_kind(run, KIND_SHORT) if x.success):
            ts = r.start + np.asarray(r.chunk_times)
            if ts[-1] < lo or ts[0] > hi:
                continue
            ax.plot(ts[1:], 1000 * np.diff(ts), drawstyle="steps-pre", color=cmap(i % 10),
                    linewidth=1.0)
        ax.axvspan(lg.start, lg.start + (lg.ttft or 0), color="tab:red", alpha=0.12,
                   label="long prompt: sent -> first token")
        ax.set_xlim(lo, hi)
        ax.set_title(f"{t}: gaps between tokens of each short chat (one line per stream)")
        ax.set_ylabel("gap (ms)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time since the run started (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(x: Any, d: int = 0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{d}f}"


CPU_COLUMNS = ("rank0", "rank1", "rank2", "client", "idle_servers", "others", "machine")


def tables(result: dict[str, Any]) -> str:
    s = result["settings"]
    prov = result.get("provenance") or {}
    measured = ""
    if prov:
        dirty = " (pd_local with uncommitted changes)" if prov.get(
            "pd_local_uncommitted_changes") else ""
        measured = (f" from a measurement of {prov['measured_at']} at commit "
                    f"{prov['git_commit'][:7]}{dirty}")
    lines = [
        "# pd_vs_colocated: generated tables",
        "",
        f"Generated by `benchmarks/pd_vs_colocated.py` on {time.strftime('%Y-%m-%d %H:%M')}"
        f"{measured}. "
        f"Short chats: {s['short_input']} +- {100 * s['range_ratio']:.0f}% tokens in, "
        f"{s['short_output']} +- {100 * s['range_ratio']:.0f}% out (ignore_eos), Poisson "
        f"{s['rate']:g}/s for {s['duration']:g} s; long prompt {s['long_input']} tokens "
        f"({s['long_output']} out) every {s['long_every']:g} s. Model "
        f"{s['model'] or 'server default (SmolLM2-135M-Instruct)'}, {s['dtype']}.",
        "",
        "## Unloaded (one request at a time, median)",
        "",
        "| topology | short TTFT ms | short TPOT ms | long TTFT ms |",
        "|---|---:|---:|---:|",
    ]
    for t, u in result["unloaded_ms"].items():
        lines.append(f"| {t} | {fmt(u.get('short_ttft_ms'))} | {fmt(u.get('short_tpot_ms'), 1)}"
                     f" | {fmt(u.get('long_ttft_ms'))} |")
    lines += ["", "## Interference (short chats only)", "",
              "| topology | phase | ITL p50 | ITL p99 | ITL p99.9 | ITL max | worst gap per "
              f"stream p50 / p90 | streams with a gap > {STALL_MS:.0f} ms | TTFT p50 | "
              "TTFT p90 | TTFT p99 | TPOT p50 | failed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, d in result["interference"].items():
        for phase in ("baseline_short", "interference_short", "interference_long"):
            x = d[phase]
            lines.append(
                f"| {t} | {phase.replace('_', ' ')} | {fmt(x['itl_ms']['p50'])} | "
                f"{fmt(x['itl_ms']['p99'])} | {fmt(x['itl_ms']['p99.9'])} | "
                f"{fmt(x['itl_ms']['max'])} | {fmt(x['stream_max_itl_ms']['p50'])} / "
                f"{fmt(x['stream_max_itl_ms']['p90'])} | "
                f"{fmt(100 * x['stalled_streams'] if x['stalled_streams'] is not None else None)}%"
                f" | {fmt(x['ttft_ms']['p50'])} | "
                f"{fmt(x['ttft_ms']['p90'])} | {fmt(x['ttft_ms']['p99'])} | "
                f"{fmt(x['tpot_ms']['p50'], 1)} | {x['failed']}/{x['requests']} |")
    lines += ["", "Headline, ITL p99 interference / baseline: " + ", ".join(
        f"{t} {d['itl_p99_ratio']:.2f}x" for t, d in result["interference"].items())
        + "; ITL p99.9: " + ", ".join(
        f"{t} {d['itl_p99.9_ratio']:.2f}x" for t, d in result["interference"].items()), ""]
    lines += ["## CPU cores used during each run (average; 2 cores in the machine)", "",
              "| run | " + " | ".join(CPU_COLUMNS) + " |", "|---|" + "---:|" * len(CPU_COLUMNS)]
    for run, use in result["cpu_cores_used"].items():
        lines.append(f"| {run} | " + " | ".join(fmt(use.get(c), 2) for c in CPU_COLUMNS) + " |")
    lines.append("")
    lines += ["## Server phase timings under interference (median ms, short / long)", ""]
    for t, d in result["interference"].items():
        ss, ll = d["interference_short"]["server_timings_ms"], d["interference_long"][
            "server_timings_ms"]
        parts = [f"{k} {fmt(ss[k]['median'], 1)} / {fmt(ll.get(k, {}).get('median'), 1)}"
                 for k in ss]
        lines.append(f"- {t}: " + "; ".join(parts))
    lines += ["", "## Sweep (short chats; a long prompt every "
              f"{s['long_every']:g} s in every run)", "",
              sweep_markdown(result["sweep"]), "## SLO sensitivity (same runs)", "",
              "Bootstrap: each sweep run's short chats resampled 1000 times; the ratio's "
              "5th-95th percentiles, and how many resamples left it undefined (a side missed "
              "the goal at every rate) or censored (a side met it at every rate).", "",
              "| SLO | " + " | ".join(f"{t} capacity (short/s)" for t in result["interference"])
              + " | ratio | bootstrap 5-95% | undefined / censored |",
              "|---|" + "---:|" * (len(result["interference"]) + 3)]
    for v in result["sensitivity"]:
        slo = ", ".join(f"{k}<={x:.0f}" for k, x in v["slo_ms"].items())
        caps = []
        for rate, status in v["capacity"].values():
            caps.append("none" if rate is None else (">= " if status == "at_least" else "")
                        + f"{rate:.2f}")
        r = v["ratio"]
        ratio = "-" if r is None or r["ratio"] is None else \
            ("" if r["bound"] == "=" else r["bound"] + " ") + f"{r['ratio']:.2f}"
        bs = v["bootstrap"]
        band = "-" if bs["p5"] is None else f"{bs['p5']:.2f} - {bs['p95']:.2f}"
        lines.append(f"| {v['label']}: {slo} | " + " | ".join(caps) + f" | {ratio} | {band} | "
                     f"{bs['undefined']} / {bs['censored']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    cli = parse_args(sys.argv[1:] if argv is None else argv)
    st, out, topologies = cli.settings, cli.out, cli.topologies
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if cli.reanalyse is not None:
        saved, topologies, runs, origin = load_runs(cli.reanalyse)
        st = replace(saved, slo=st.slo, ttft_factor=st.ttft_factor, tpot_factor=st.tpot_factor,
                     attainment=st.attainment)
        say(f"re-analysing {len(runs)} runs from {cli.reanalyse} into {out}")
    else:
        if cli.wait_quiet > 0:
            say(f"machine load before the run: {wait_for_quiet(cli.wait_quiet):.2f} cores")
        say(f"topologies {topologies} "
            f"({'one at a time' if cli.one_at_a_time else 'interleaved'}); results into {out}")
        origin = provenance()
        runs = run_study(st, topologies, cli.log_dir, cli.one_at_a_time)
        say(f"measured in {time.monotonic() - t0:.0f} s; analysing")
    result = analyse(runs, topologies, st, out, origin)
    for p in plots(runs, result, out):
        say(f"plot: {p}")
    md = tables(result)
    (out / "results.md").write_text(md)
    print(md)
    say(f"done in {time.monotonic() - t0:.0f} s: {out / 'study.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
