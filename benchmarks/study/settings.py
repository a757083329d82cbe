"""The study's settings and command line (`Settings`, `parse_args`), its constants, and `Run`,
the record the measuring half produces and the analysing half reads."""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from pd_local.loadtest.runner import RunResult
from pd_local.loadtest.workloads import WorkloadConfig


REPO = Path(__file__).resolve().parents[2]  # benchmarks/study/settings.py -> the repository
TOPOLOGIES: dict[str, list[str]] = {
    "1p1d": ["--prefill", "1", "--decode", "1"],
    "colocated-2": ["--colocated", "2"],
}
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
STALL_MS = 500.0  # a gap a reader notices as a hiccup
TEMPLATE_TOKENS = 64  # chat template + default system prompt, generously (SmolLM2: ~30)


def say(msg: str) -> None:
    """A progress line on stderr, written above the study's tqdm bar when one is shown."""
    tqdm.write(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)


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
    p.add_argument("--dtype", default=None, choices=("auto", "bfloat16", "float32"),
                   help="default: what the server's dtype = auto picks on this machine")
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
    st = Settings(a.model, a.dtype or resolved_auto_dtype(), a.short_input, a.short_output, a.range_ratio, a.long_input,
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


@dataclass
class Run:
    """One load-test run of one topology, kept in memory so that the SLO can be applied later."""

    topology: str
    phase: str  # calibration-short | calibration-long | baseline | interference | sweep
    rate: float | None
    run: RunResult
    cpu: dict[str, float]  # average cores used during the run (cpu_use)


def resolved_auto_dtype() -> str:
    """The dtype the server's "auto" picks here (bfloat16 with native CPU bf16, else float32),
    named in the report so a reader knows what ran."""
    from pd_local.model.dtype import read_cpu_flags, resolve_dtype_name

    return resolve_dtype_name("auto", "cpu", read_cpu_flags())[0]
