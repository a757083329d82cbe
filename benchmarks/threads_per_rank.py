"""Threads per rank: each topology with one thread per worker (what torchrun's OMP_NUM_THREADS=1
gave every rank before engine.threads) against the default plan (engine.threads = 0), in one run.

For each (topology, threads): `pd-local serve`, then `pd-local bench` on /v1/completions with 128
prompt and 128 output tokens (ignore_eos) at 1 stream and at 16, and the CPU each rank used
during the 16-stream run (rank 0's share is what the plan's core for rank 0 rests on).

    python benchmarks/threads_per_rank.py [--dtype auto] [--out benchmarks/results/threads_per_rank.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py, study/
import servers  # noqa: E402
from study.measure import cpu_snapshot, cpu_use  # noqa: E402

TOPOLOGIES = {"colocated-1": ["--colocated", "1"], "1P1D": ["--prefill", "1", "--decode", "1"],
              "colocated-2": ["--colocated", "2"]}
LOADS = {"1 stream": (1, 6), "16 streams": (16, 48)}  # (max concurrency, requests)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--out", type=Path, default=servers.REPO / "benchmarks/results/threads_per_rank.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="threads-"))
    rows = []
    for topo in args.topologies.split(","):
        for threads in ("1", "0"):
            name = f"{topo} threads={'auto' if threads == '0' else threads}"
            flags = [*TOPOLOGIES[topo], "--dtype", args.dtype, "--threads", threads]
            proc, url = servers.start_server(name, flags, tmp / f"{topo}-{threads}.log")
            try:
                ranks = httpx.get(f"{url}/v1/cluster", timeout=10).json()["ranks"]
                row = {"name": name, "topology": topo, "threads": threads,
                       "ranks": {r["rank"]: [r["role"], r["threads"], r["cpus"]] for r in ranks}}
                for load, (c, n) in LOADS.items():
                    a = cpu_snapshot(proc.pid)
                    row[load] = servers.bench_completions(url, c, n, tmp / f"{topo}-{threads}-{c}.json")
                    if c > 1:
                        row["cpu_cores_16"] = cpu_use(a, cpu_snapshot(proc.pid))
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
            finally:
                servers.stop_server(proc)
    result = {"when": time.strftime("%Y-%m-%d %H:%M"), "dtype": args.dtype,
              "cpu": _cpu_model(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (" avx512_bf16" if "avx512_bf16" in flags else "")
    return "unknown"


def markdown(rows: list[dict]) -> str:
    out = ["| server | threads per worker | 1 stream: out tok/s | TTFT ms | ITL ms "
           "| 16 streams: out tok/s | TTFT ms | ITL ms | rank 0 cores at 16 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["1 stream"], r["16 streams"]
        threads = ", ".join(f"{t} on {c}" for role, t, c in r["ranks"].values())
        out.append(f"| {r['name']} | {threads} | {a['out_tok_s']} | {a['ttft_ms']} | {a['itl_ms']} "
                   f"| {b['out_tok_s']} | {b['ttft_ms']} | {b['itl_ms']} "
                   f"| {r['cpu_cores_16'].get('rank0', 0):.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
