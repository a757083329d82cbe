"""Elastic workers against the static splits on the shifting workload (issue 19): `--elastic 2`,
`--prefill 1 --decode 1` and `--colocated 2`, the same model, the same requests, one server at a
time, each driven by `pd-local bench --workload shifting` (docs/loadtest.md): phases of
prefill-heavy, decode-heavy and mixed traffic.

Per topology: goodput (requests meeting every SLO per second) over the whole run and per phase,
attainment, TTFT and TPOT p50/p90; elastic's ratio to the better static split, whole run and per
phase; where elastic placed its requests (local or remote prefill, from /v1/cluster and
/metrics). Prints a table, writes JSON (with each run's result file) to --out.

    python benchmarks/elastic.py                      # ~6 min on 2 CPU cores
    python benchmarks/elastic.py --phase-duration 10 --topologies elastic-2,1P1D   # quicker
    python benchmarks/elastic.py --rate 0.5,1,1.5 --slo ttft=2000,tpot=100         # a sweep, ~18 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py
from head_of_line import provenance  # noqa: E402
from servers import start_server, stop_server  # noqa: E402

TOPOLOGIES = {"elastic-2": ["--elastic", "2"], "1P1D": ["--prefill", "1", "--decode", "1"],
              "colocated-2": ["--colocated", "2"]}
STATIC = ("1P1D", "colocated-2")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topologies", default=",".join(TOPOLOGIES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rate", default="0.5", help="requests/s in every phase (default 0.5); a list "
                   "(0.5,1,1.5) runs each in turn, each rate's servers in the same run")
    p.add_argument("--phases", default="prefill,decode,mixed")
    p.add_argument("--phase-duration", type=float, default=30.0)
    p.add_argument("--long-input-len", type=int, default=400, help="prefill-heavy prompts (words)")
    p.add_argument("--long-output-len", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32, help="decode-heavy prompts (words)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--slo", default="ttft=3000,tpot=150", help="what a good request meets (ms)")
    p.add_argument("--elastic-set", action="append", default=[], metavar="KEY=VALUE",
                   help="more --set for the elastic server (e.g. slo.tpot_ms=1e9: no TPOT budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/elastic.json"))
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/pd-local-elastic-logs"))
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[elastic] {msg}", file=sys.stderr, flush=True)


def run_one(name: str, a: argparse.Namespace, result: Path) -> dict[str, Any]:
    slo = dict(kv.split("=") for kv in a.slo.split(","))  # the elastic placement aims at the same
    aims = [x for k in ("ttft", "tpot") if k in slo for x in ("--set", f"slo.{k}_ms={float(slo[k])}")]
    extra = [x for kv in a.elastic_set for x in ("--set", kv)] if name == "elastic-2" else []
    proc, url = start_server(name, [*TOPOLOGIES[name], "--dtype", a.dtype, *aims, *extra], a.log_dir / f"{name}.log")
    try:
        cmd = [sys.executable, "-m", "pd_local", "bench", "--base-url", url, "--endpoint",
               "/v1/completions", "--workload", "shifting", "--request-rate", str(a.rate),
               "--phases", a.phases, "--phase-duration", str(a.phase_duration),
               "--long-input-len", str(a.long_input_len), "--long-output-len", str(a.long_output_len),
               "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--ignore-eos",
               "--slo", a.slo, "--seed", str(a.seed), "--result-file", str(result), "--quiet"]
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        say(f"{name}: {time.monotonic() - t0:.0f} s")
        cluster = httpx.get(f"{url}/v1/cluster", timeout=10, trust_env=False).json()
        metrics = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    finally:
        stop_server(proc)
    r = json.loads(result.read_text())
    transfers = next((float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("pd_local_kv_transfers_total")), 0.0)
    phases = {k: {"goodput": v.get("request_goodput"), "attainment": v.get("slo_attainment"),
                  "completed": v["completed"], "failed": v["failed"],
                  "ttft_p50_ms": v.get("median_ttft_ms"), "ttft_p90_ms": v.get("p90_ttft_ms"),
                  "tpot_p50_ms": v.get("median_tpot_ms"), "tpot_p90_ms": v.get("p90_tpot_ms")}
              for k, v in (r.get("per_kind") or {f"phase 1: {a.phases}": r}).items()}  # one phase: the run
    span = len(a.phases.split(",")) * a.phase_duration
    good = (r["slo_attainment"] or 0) * (r["completed"] + r["failed"])
    return {"goodput": good / span, "attainment": r["slo_attainment"], "completed": r["completed"],
            "failed": r["failed"], "ttft_p90_ms": r.get("p90_ttft_ms"), "tpot_p90_ms": r.get("p90_tpot_ms"),
            "phases": phases, "kv_transfers": transfers,
            "ranks": [{k: x[k] for k in ("rank", "role", "prefilled_tokens", "generated_tokens")}
                      for x in cluster["ranks"]]}


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """elastic-2's goodput / the better static split's, whole run and per phase."""
    static = [runs[s] for s in STATIC if s in runs]
    if "elastic-2" not in runs or not static:
        return {}
    e = runs["elastic-2"]

    def ratio(mine: float | None, best: float | None) -> float | None:
        return None if mine is None or not best else mine / best
    out: dict[str, Any] = {"whole": ratio(e["goodput"], max(s["goodput"] for s in static))}
    for k in e["phases"]:
        out[k] = ratio(e["phases"][k]["goodput"], max((s["phases"][k]["goodput"] or 0) for s in static))
    return out


def table(runs: dict[str, dict[str, Any]], rat: dict[str, Any]) -> str:
    def f(x: float | None, d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"
    phases = list(next(iter(runs.values()))["phases"])
    head = "| topology | goodput (req/s) | attainment | " + " | ".join(phases) + " | KV transfers |"
    lines = [head, "|" + "---|" * (4 + len(phases))]
    for name, r in runs.items():
        cells = [f"{f(p['goodput'])} ({f(100 * (p['attainment'] or 0), 0)}%)" for p in r["phases"].values()]
        lines.append(f"| {name} | {f(r['goodput'])} | {f(100 * (r['attainment'] or 0), 0)}% | "
                     + " | ".join(cells) + f" | {r['kv_transfers']:.0f} |")
    if rat:
        lines.append(f"| elastic / better static | {f(rat['whole'])} | | "
                     + " | ".join(f(rat.get(k)) for k in phases) + " | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    names = a.topologies.split(",")
    unknown = [n for n in names if n not in TOPOLOGIES]
    if unknown:
        raise SystemExit(f"unknown topologies {unknown}; known: {', '.join(TOPOLOGIES)}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    rates, out, by_rate = [float(r) for r in str(a.rate).split(",")], a.out, {}
    for rate in rates:
        a.rate = rate
        a.out = out if len(rates) == 1 else out.with_name(f"{out.stem}-r{rate:g}.json")
        runs = {}
        for name in names:
            say(f"{name}: serving, then {a.phases} x {a.phase_duration:g} s at {a.rate:g} req/s")
            runs[name] = run_one(name, a, a.out.with_name(f"{a.out.stem}-{name}.json"))
        rat = ratios(runs)
        md = table(runs, rat)
        print(f"{rate:g} req/s:\n{md}" if len(rates) > 1 else md)
        by_rate[rate] = {"runs": runs, "elastic_over_better_static": rat, "table": md}
    a.out = out
    one = by_rate[rates[0]] if len(rates) == 1 else {"rates": {f"{r:g}": v for r, v in by_rate.items()}}
    a.out.write_text(json.dumps({"provenance": provenance(), "settings": {k: str(v) for k, v in vars(a).items()},
                                 **one}, indent=1))
    say(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
