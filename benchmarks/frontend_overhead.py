"""What the HTTP front-end costs: TTFT through HTTP vs the offline engine, and /health under load.

1. The same prompt (exact token ids) three ways, in one run:
   - offline: an in-process Engine, 1 thread (torchrun gives each worker rank one thread), time
     from add_request to the first token;
   - server-side: the router's own ttft (arrival at rank 0 -> first token back at rank 0);
   - client-side: streamed TTFT measured by an HTTP client.
   client - server = HTTP + SSE + detokenisation; server - offline = router + rank messages.
2. /health latency idle, then while `--load` streams are decoding.

    python benchmarks/frontend_overhead.py [--topology colocated-1|1p1d] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import stop_server  # noqa: E402
from ttft_pd_vs_colocated import TOPOLOGIES, one_request, start  # noqa: E402

from pd_local.config import EngineConfig  # noqa: E402
from pd_local.engine.engine import Engine  # noqa: E402
from pd_local.model.weights import load_model  # noqa: E402
from pd_local.engine.sampling import SamplingParams  # noqa: E402


def offline_ttft_ms(model_dir: str, prompt: list[int], repeats: int) -> float:
    torch.set_num_threads(1)
    model, _ = load_model(model_dir, torch.bfloat16)
    engine = Engine(model, EngineConfig(kv_cache_gb=0.2))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        engine.add_request(i, prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        while not engine.step():
            pass
        times.append((time.perf_counter() - t0) * 1000)
        engine.abort(i)
    return statistics.median(times[1:])  # the first run warms kernels up


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def health_latencies(url: str, n: int, load: int, prompt: list[int]) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as c:
        async def stream() -> None:
            body = {"prompt": prompt, "max_tokens": 256, "ignore_eos": True, "stream": True}
            async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass

        tasks = [asyncio.create_task(stream()) for _ in range(load)]
        await asyncio.sleep(1.0 if load else 0.0)  # let the load reach steady decoding
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = await c.get(f"{url}/health")
            lat.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", choices=["colocated-1", "1p1d-layerwise"], default="colocated-1")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--load", type=int, default=32, help="concurrent decoding streams for the /health test")
    ap.add_argument("--out", default="benchmarks/results/frontend_overhead.json")
    args = ap.parse_args()
    from pd_local.cli.weights import ensure_default_model

    model_dir = str(ensure_default_model())
    prompt = [100 + (i * 37) % 40000 for i in range(args.prompt_len)]
    print("[bench] offline engine ...", file=sys.stderr, flush=True)
    offline = offline_ttft_ms(model_dir, prompt, args.repeats)
    print(f"[bench] starting {args.topology} ...", file=sys.stderr, flush=True)
    proc, url = start(args.topology, TOPOLOGIES[args.topology], 2048)
    try:
        with httpx.Client(timeout=60) as client:
            one_request(client, url, prompt)
            runs = [one_request(client, url, prompt) for _ in range(args.repeats)]
        client_ttft = statistics.median(t for t, _ in runs)
        server_ttft = statistics.median(ph["ttft"] for _, ph in runs)
        idle = asyncio.run(health_latencies(url, 40, 0, prompt[:32]))
        busy = asyncio.run(health_latencies(url, 40, args.load, prompt[:32]))
    finally:
        stop_server(proc)
    result = {
        "topology": args.topology, "prompt_len": args.prompt_len,
        "offline_ttft_ms": offline, "server_ttft_ms": server_ttft, "client_ttft_ms": client_ttft,
        "http_sse_overhead_ms": client_ttft - server_ttft, "router_overhead_ms": server_ttft - offline,
        "health_idle_p50_ms": percentile(idle, 50), "health_idle_p99_ms": percentile(idle, 99),
        "health_busy_p50_ms": percentile(busy, 50), "health_busy_p99_ms": percentile(busy, 99),
        "health_busy_streams": args.load,
    }
    print(f"\n| {args.prompt_len}-token prompt, {args.topology} | ms |\n|---|---|")
    for k in ("offline_ttft_ms", "server_ttft_ms", "client_ttft_ms", "http_sse_overhead_ms", "router_overhead_ms",
              "health_idle_p50_ms", "health_idle_p99_ms", "health_busy_p50_ms", "health_busy_p99_ms"):
        print(f"| {k} | {result[k]:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
