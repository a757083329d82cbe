"""Time to first token at low load: 1P1D (layerwise and whole transfer) vs colocated-1.

Launches each topology with `pd-local serve` on a free loopback port, sends sequential streamed
requests whose prompts are exact token-id lists (/v1/completions), and records the client-side
TTFT and the server's phase timings. Quoted as ratios to colocated-1 measured in the same run.

    python benchmarks/ttft_pd_vs_colocated.py [--lengths 128,512,2048] [--repeats 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import start_server, stop_server  # noqa: E402

TOPOLOGIES = {
    "colocated-1": ["--colocated", "1"],
    "1p1d-layerwise": ["--prefill", "1", "--decode", "1", "--transfer", "layerwise"],
    "1p1d-whole": ["--prefill", "1", "--decode", "1", "--transfer", "whole"],
}


def start(name: str, extra: list[str], max_len: int) -> tuple[subprocess.Popen, str]:
    flags = [*extra, "--set", f"engine.max_model_len={max_len}", "--set", f"engine.max_prefill_tokens={max_len}"]
    return start_server(name, flags, Path(f"/tmp/pd_local_bench_{name}.log"), timeout_s=180)


def one_request(client: httpx.Client, url: str, prompt: list[int]) -> tuple[float, dict[str, float]]:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    ttft, timings = None, {}
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if ttft is None and obj.get("choices") and obj["choices"][0].get("text"):
                ttft = time.perf_counter() - t0
            if "pd_local" in obj:
                timings = obj["pd_local"]["timings_ms"]
    assert ttft is not None, "no token arrived"
    return ttft * 1000.0, timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/ttft_pd_vs_colocated.json")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    prompts = {n: [rng.randrange(100, 49000) for _ in range(n)] for n in lengths}
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name, extra in TOPOLOGIES.items():
        print(f"[bench] starting {name} ...", file=sys.stderr, flush=True)
        proc, url = start(name, extra, max(lengths) + 64)
        try:
            with httpx.Client(timeout=120) as client:
                one_request(client, url, prompts[lengths[0]])  # warm-up (kernels, connections)
                results[name] = {}
                for n in lengths:
                    ttfts, phases = [], []
                    for _ in range(args.repeats):
                        t, ph = one_request(client, url, prompts[n])
                        ttfts.append(t)
                        phases.append(ph)
                    med = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
                    results[name][n] = {"ttft_ms_median": statistics.median(ttfts), "ttft_ms_min": min(ttfts),
                                        **{f"server_{k}_ms": v for k, v in med.items()}}
                    print(f"[bench] {name} {n} tokens: TTFT median {results[name][n]['ttft_ms_median']:.1f} ms",
                          file=sys.stderr, flush=True)
        finally:
            stop_server(proc)
    base = results["colocated-1"]
    print("\n| prompt tokens | colocated-1 TTFT ms | 1P1D layerwise ms (ratio) | 1P1D whole ms (ratio) | layerwise kv_transfer ms | whole kv_transfer ms |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        c = base[n]["ttft_ms_median"]
        lw, wh = results["1p1d-layerwise"][n], results["1p1d-whole"][n]
        print(f"| {n} | {c:.1f} | {lw['ttft_ms_median']:.1f} ({lw['ttft_ms_median'] / c:.2f}x) | "
              f"{wh['ttft_ms_median']:.1f} ({wh['ttft_ms_median'] / c:.2f}x) | "
              f"{lw.get('server_kv_transfer_ms', 0):.1f} | {wh.get('server_kv_transfer_ms', 0):.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
