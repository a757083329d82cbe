"""Head-of-line blocking through the real server: what one long prompt costs the requests
around it, per topology and prefill policy, in units of L (the long prompt's TTFT).

The workload is `pd-local bench --workload head_of_line` (docs/loadtest.md), driven through
its Python API: one stream decoding from 0; at T (`--every`) the baseline, 3 short chats with no
long prompt in flight; at 2T a ~1730-token prompt (1700 words + the chat template), and 0.3 s
later 3 short chats. Per run: each short chat's extra wait over its baseline twin / L, the
stream's largest gap while the long prompt prefills / L, and the stream's ITL p99 during the
prefill / before it (the 1P1D decode-isolation figure).

Every (topology, policy) gets its own `pd-local serve` (SmolLM2 float32 by default); all of them
stay up (an idle one uses ~0.02 cores) and the runs go round-robin, in a rotated order each
repeat, so that drift of a shared host hits every configuration alike. Figures are medians over
the repeats with their min..max. Prints the table, writes JSON (with every run's report).

    python benchmarks/head_of_line.py                       # ~15 min on 2 busy CPU cores
    python benchmarks/head_of_line.py --repeats 1 --topologies 1P1D --policies srpf
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py
from servers import REPO, start_server, stop_server  # noqa: E402

from pd_local.loadtest.client import RequestOptions, RequestResult  # noqa: E402
from pd_local.loadtest.head_of_line import head_of_line_report  # noqa: E402
from pd_local.loadtest.runner import RunOptions, fetch_model, run_benchmark  # noqa: E402
from pd_local.loadtest.workloads import (RequestSpec, WorkloadConfig,  # noqa: E402
                                         make_schedule, random_words)

TOPOLOGIES = {"colocated-1": ["--colocated", "1"], "1P1D": ["--prefill", "1", "--decode", "1"]}
FIGURES = ("max_short_extra_wait_L", "max_stream_gap_L", "itl_p99_ratio",
           "itl_p99_ratio_vs_baseline", "L_s")


def provenance() -> dict[str, str]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    cpu, flags = platform.machine(), ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == platform.machine():
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            have = line.split(":", 1)[1].split()
            flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD")
            + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""),
            "cpu": cpu, "cpu_flags": flags}


def warmup(seed: int, chat: bool) -> list[RequestSpec]:
    """Untimed: two short chats and one 300-word prompt (two chunks), so that no timed request
    pays for a first allocation."""
    import numpy as np

    rng = np.random.default_rng([seed, 7])
    specs = [RequestSpec(random_words(rng, n), None, n, 4) for n in (40, 40, 300)]
    return [s.for_endpoint(chat) for s in specs]


def report(results: list[RequestResult]) -> dict[str, Any]:
    """The head_of_line report, plus L's median over the long prompts and the raw material
    (every request's kind, send time and chunk times) that `rebuilt` reads back."""
    rep = head_of_line_report(results)
    rep["L_s"] = statistics.median(g["L_s"] for g in rep["groups"])
    rep["requests"] = [{"kind": r.kind, "start": round(r.start, 4), "ok": r.success,
                        "chunks": [round(t, 4) for t in r.chunk_times]} for r in results]
    return rep


def rebuilt(run: dict[str, Any]) -> dict[str, Any]:
    """An earlier run's report recomputed by this code from its raw material (as it was, if it
    has none)."""
    if "requests" not in run:
        return run
    results = []
    for i, q in enumerate(run["requests"]):
        r = RequestResult(i, q["kind"], 0, 0, start=q["start"], success=q.get("ok", True),
                          chunk_times=q["chunks"])
        r.ttft = q["chunks"][0] if q["chunks"] else None
        results.append(r)
    keep = {k: run[k] for k in ("failed", "duration_s", "batch") if k in run}
    return {**report(results), **keep}


async def one_run(url: str, wl: WorkloadConfig, seed: int) -> dict[str, Any]:
    model = await fetch_model(url, None, 30.0)
    opts = RunOptions(request=RequestOptions(url=url + "/v1/chat/completions", model=model,
                                             chat=True, ignore_eos=True, timeout=300.0))
    run = await run_benchmark(make_schedule(wl, 1.0, 1.0, None, None, seed, True), opts,
                              warmup(seed, True))
    rep = report(run.results)
    rep["failed"] = [r.error for r in run.results if not r.success]
    rep["duration_s"] = run.duration
    return rep


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for f in FIGURES:
        xs = [r[f] for r in runs if r.get(f) is not None]
        out[f] = ({"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}
                  if xs else {"median": None, "min": None, "max": None, "n": 0})
    return out


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    def cell(s: dict[str, Any], unit: str = "L") -> str:
        if s["median"] is None:
            return "-"
        return f"{s['median']:.2f} {unit} ({s['min']:.2f}-{s['max']:.2f})"

    head = ["config", "short chats' extra wait", "stream's largest gap",
            "stream ITL p99 interfered/quiet", "... /baseline window", "L (s)", "runs"]
    rows = [[name, cell(s["max_short_extra_wait_L"]), cell(s["max_stream_gap_L"]),
             cell(s["itl_p99_ratio"], "x"), cell(s["itl_p99_ratio_vs_baseline"], "x"),
             cell(s["L_s"], "s"), str(s["L_s"]["n"])]
            for name, s in summary.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/smollm2-135m-instruct-f32")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--topologies", default="colocated-1,1P1D")
    ap.add_argument("--policies", default="fcfs,srpf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-len", type=int, default=1700, help="words (1 token each) + template")
    ap.add_argument("--every", type=float, default=10.0,
                    help="T: baseline at T, long at 2T; T must exceed the baseline chats' E2E")
    ap.add_argument("--stream-output-len", type=int, default=1900,
                    help="a cap: the stream is ended once the rest has finished")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra `pd-local serve --set` for every server")
    ap.add_argument("--append", type=Path, metavar="JSON",
                    help="an earlier result of this script (same workload): its runs join these "
                         "in the summary, each batch keeping its own provenance")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/head_of_line.json")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/pd_local_hol_logs"))
    args = ap.parse_args()
    wl = WorkloadConfig(name="head_of_line", input_len=40, output_len=16,
                        long_input_len=args.long_len, long_output_len=16, long_every=args.every,
                        streams=1, stream_output_len=args.stream_output_len, num_longs=1,
                        shorts_per_long=3, short_delay=0.3)
    configs = [(t, p) for t in args.topologies.split(",") for p in args.policies.split(",")]
    servers: dict[str, tuple[Any, str]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    origin = provenance()
    earlier: dict[str, Any] = json.loads(args.append.read_text()) if args.append else {}
    t0 = time.monotonic()
    try:
        for topo, policy in configs:
            name = f"{topo} {policy}"
            flags = ["--model", args.model, "--dtype", args.dtype, *TOPOLOGIES[topo],
                     "--set", f"engine.prefill_policy={policy}"]
            for kv in args.set:
                flags += ["--set", kv]
            servers[name] = start_server(name, flags, args.log_dir / f"{topo}-{policy}.log")
            runs[name] = [rebuilt(r) for r in earlier.get("runs", {}).get(name, [])]
            print(f"[{time.monotonic() - t0:5.0f} s] up: {name}", file=sys.stderr, flush=True)
        names = list(servers)
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                r = asyncio.run(one_run(servers[name][1], wl, seed=rep))
                r["batch"] = origin["date"]
                runs[name].append(r)
                gap = r["max_stream_gap_L"]
                print(f"[{time.monotonic() - t0:5.0f} s] {name} #{rep}: L {r['L_s']:.2f} s, "
                      f"extra wait {r['max_short_extra_wait_L']:.2f} L, gap "
                      f"{'-' if gap is None else f'{gap:.2f}'} L, ITL p99 "
                      f"x{r['itl_p99_ratio'] or 0:.2f}, failed {len(r['failed'])}",
                      file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    summary = {name: summarise(rs) for name, rs in runs.items()}
    md = table(summary)
    result = {**origin, "model": args.model, "dtype": args.dtype, "workload": vars(wl) | {
        "long_input_len_note": "words, 1 token each; the chat template adds ~30 tokens"},
        "server_set": args.set, "repeats": args.repeats,
        "earlier_batches": earlier.get("earlier_batches", []) + (
            [{k: earlier[k] for k in ("date", "commit", "cpu", "cpu_flags", "repeats")}]
            if earlier else []), "summary": summary, "table": md,
        "runs": runs}
    result["workload"] = {k: str(v) if isinstance(v, Path) else v
                          for k, v in result["workload"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{origin['date']}, commit {origin['commit']}, {origin['cpu']} ({origin['cpu_flags']})")
    print(md)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
