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

The code is in `benchmarks/study/`: `settings` (flags, `Settings`, `Run`), `measure` (servers,
schedules, CPU accounting), `analysis` (SLOs, attainment, bootstrap, the JSON files) and
`report` (PNGs, results.md). This file is the entry point and re-exports what the smoke test
(tests/test_study_smoke.py) reaches for.

    python benchmarks/pd_vs_colocated.py            # the full study, ~14 min on 2 CPU cores
    python benchmarks/pd_vs_colocated.py --quick    # smoke run, ~2.5 min, into /tmp
    python benchmarks/pd_vs_colocated.py --reanalyse docs/benchmarks --out-dir /tmp/x --slo tpot=90
"""

from __future__ import annotations

import json  # noqa: F401  (re-exported for tests/test_study_smoke.py)
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py, study/
from study.analysis import analyse, load_runs, provenance  # noqa: E402
from study.measure import (cpu_snapshot, cpu_use, interference_schedule, plan,  # noqa: E402,F401
                           run_study, wait_for_quiet)
from study.report import plots, tables  # noqa: E402
from study.settings import Run, parse_args, say  # noqa: E402,F401

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
