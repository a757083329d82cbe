"""Soak: a long random mix of everything clients do to a server, then check nothing leaked.

For each topology (1P1D and 2P2D by default) it starts `pd-local serve` with a small KV cache and
a small max_queue, then runs N operations (default 1000; or --duration seconds), 8 at a time,
drawn at random (seeded) from:

    normal        streamed to the end (8-32 tokens)        expect 200 + [DONE]
    whole         non-streamed to the end                  expect 200
    disconnect    streamed, client leaves after 1-20 chunks
    early_abort   streamed, client leaves before any token
    timeout       non-streamed with a client timeout of 50-500 ms (client gives up)
    bad           one of several malformed bodies          expect 4xx, never 5xx
    burst         max_queue + 6 requests at once            expect some 429, the rest 200

Afterwards: /health must be 200, every decode rank's free blocks == total, nothing in flight,
and each rank's resident memory (RSS) is compared with its value after a warm-up of 50 ops.
Prints a table and writes JSON (benchmarks/results/soak.json). Not a timed test: run it by hand.

    python benchmarks/soak.py [--ops 1000 | --duration 600] [--topologies 1p1d,2p2d]
                              [--model DIR] [--dtype float32] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import REPO, start_server, stop_server  # noqa: E402

from pd_local.cli.serve import descendants  # noqa: E402

TOPOLOGIES = {"1p1d": ["--prefill", "1", "--decode", "1"],
              "2p2d": ["--prefill", "2", "--decode", "2"]}
MAX_QUEUE = 24
OPS = {"normal": 30, "whole": 10, "disconnect": 20, "early_abort": 8, "timeout": 10, "bad": 12,
       "burst": 3}
BAD_BODIES = [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"messages": [{"role": "user", "content": "hi"}], "n": 4},
    {"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"},
    {"messages": [{"role": "user", "content": "word " * 5000}]},  # longer than the context
]
WORDS = "the a prefill decode rank cache token stream block tensor link router".split()


def chat(rng: random.Random, stream: bool) -> dict:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
    return {"messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(8, 32),
            "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 1000), "stream": stream}


async def run_op(c: httpx.AsyncClient, url: str, kind: str, rng: random.Random) -> str:
    """One operation; returns its outcome label (a bad outcome names what went wrong). A 429
    is a fine outcome for any operation: bursts fill max_queue while others run."""
    endpoint = f"{url}/v1/chat/completions"
    if kind == "bad":
        r = await c.post(endpoint, json=rng.choice(BAD_BODIES))
        return "4xx" if 400 <= r.status_code < 500 else f"BAD status {r.status_code}"
    if kind == "burst":
        rs = await asyncio.gather(*[c.post(endpoint, json=chat(rng, False))
                                    for _ in range(MAX_QUEUE + 6)])
        codes = collections.Counter(r.status_code for r in rs)
        if set(codes) - {200, 429}:
            return f"BAD burst statuses {dict(codes)}"
        return "burst with 429" if codes[429] else "burst all 200"
    if kind in ("whole", "timeout"):
        timeout = rng.uniform(0.05, 0.5) if kind == "timeout" else 300
        try:
            r = await c.post(endpoint, json=chat(rng, False), timeout=timeout)
        except httpx.TimeoutException:
            return "client timed out"
        return status_outcome(r.status_code, "200")
    leave_after = {"normal": 10**9, "disconnect": rng.randint(1, 20), "early_abort": 0}[kind]
    seen, done = 0, False
    async with c.stream("POST", endpoint, json=chat(rng, True)) as r:
        if r.status_code != 200:
            return status_outcome(r.status_code, "")
        if leave_after == 0:
            return "left before any token"
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                seen += 1
                if '"error"' in line:
                    return f"BAD error event {line[:200]}"
                done = line == "data: [DONE]"
            if seen >= leave_after:
                return "left mid-stream"
    return "200 [DONE]" if done else "BAD stream ended without [DONE]"


def status_outcome(status: int, ok: str) -> str:
    if status == 200:
        return ok
    return "429 queue full" if status == 429 else f"BAD status {status}"


def rank_rss_mb(server_pid: int) -> dict[int, float]:
    """{rank: resident MB} of the ranks under `pd-local serve` (found by their RANK variable)."""
    out = {}
    for pid in descendants(server_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if rank is None or b"pd_local.launch" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        out[rank] = kb / 1024
    return out


def metric(url: str, name: str) -> dict[str, float]:
    """{label string like '{rank="2",role="decode"}' or '': value} of one family of /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{{{labels}}}" if labels else ""] = sample.value
    return out


async def soak(url: str, server_pid: int, ops: int, duration: float | None, seed: int,
               concurrency: int = 8, warmup: int = 50) -> dict:
    rng = random.Random(seed)
    kinds = [k for k, w in OPS.items() for _ in range(w)]
    plan = iter(range(10**9))
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    done = 0
    rss_warm: dict[int, float] = {}
    t0 = time.monotonic()

    def more() -> bool:
        if duration is not None:
            return time.monotonic() - t0 < duration
        return done < ops

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal done, rss_warm
        while more():
            i = next(plan)
            op_rng = random.Random(rng.random() + i)
            kind = op_rng.choice(kinds)
            try:
                outcome = await run_op(c, url, kind, op_rng)
            except httpx.HTTPError as e:
                outcome = f"BAD {type(e).__name__}: {e}"
            counts[kind][outcome] += 1
            done += 1
            if done == warmup:
                rss_warm = rank_rss_mb(server_pid)
            if done % 100 == 0:
                print(f"  {done} ops, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=concurrency * (MAX_QUEUE + 6))
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as c:
        await asyncio.gather(*[worker(c) for _ in range(concurrency)])
    seconds = time.monotonic() - t0

    deadline = time.monotonic() + 60
    while True:  # the last aborts may still be reaching the ranks
        free, total = metric(url, "pd_local_kv_blocks_free"), metric(url, "pd_local_kv_blocks_total")
        decode = {k: (v, total[k]) for k, v in free.items() if 'role="prefill"' not in k}
        in_flight = metric(url, "pd_local_requests_in_flight").get("", -1)
        if (all(f == t for f, t in decode.values()) and in_flight == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    health = httpx.get(f"{url}/health", timeout=10, trust_env=False).status_code
    rss_end = rank_rss_mb(server_pid)
    bad = {k: {o: n for o, n in c.items() if o.startswith("BAD")} for k, c in counts.items()}
    return {
        "ops": done, "seconds": round(seconds, 1),
        "outcomes": {k: dict(c) for k, c in counts.items()},
        "bad_outcomes": {k: v for k, v in bad.items() if v},
        "health_after": health, "in_flight_after": in_flight,
        "decode_blocks_free_total_after": decode,
        "blocks_all_free": all(f == t for f, t in decode.values()),
        "rss_mb_after_warmup": rss_warm, "rss_mb_end": rss_end,
        "rss_growth_mb": {r: round(rss_end.get(r, 0) - rss_warm.get(r, 0), 1) for r in rss_warm},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=1000)
    p.add_argument("--duration", type=float, default=None, help="seconds (instead of --ops)")
    p.add_argument("--topologies", default="1p1d,2p2d")
    p.add_argument("--model", default="weights/smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "soak.json")
    args = p.parse_args()
    results = {}
    for name in args.topologies.split(","):
        flags = [*TOPOLOGIES[name], "--model", args.model, "--dtype", args.dtype,
                 "--set", "engine.max_model_len=512", "--set", "engine.kv_cache_gb=0.05",
                 "--set", f"server.max_queue={MAX_QUEUE}"]
        print(f"[soak] {name}: starting", file=sys.stderr, flush=True)
        proc, url = start_server(name, flags, REPO / "out" / f"soak_{name}.log")
        try:
            results[name] = asyncio.run(soak(url, proc.pid, args.ops, args.duration, args.seed))
        finally:
            stop_server(proc)
        results[name]["server_exit_code"] = proc.returncode
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    ok = True
    print("\n| topology | ops | s | bad | health | in flight | blocks free | RSS growth MB "
          "per rank | exit |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n_bad = sum(sum(v.values()) for v in r["bad_outcomes"].values())
        ok &= (n_bad == 0 and r["health_after"] == 200 and r["blocks_all_free"]
               and r["in_flight_after"] == 0 and r["server_exit_code"] == 0)
        print(f"| {name} | {r['ops']} | {r['seconds']} | {n_bad} | {r['health_after']} | "
              f"{r['in_flight_after']:g} | {r['blocks_all_free']} | {r['rss_growth_mb']} | "
              f"{r['server_exit_code']} |")
    for name, r in results.items():
        print(f"\n{name} outcomes: {json.dumps(r['outcomes'])}")
        if r["bad_outcomes"]:
            print(f"{name} BAD: {json.dumps(r['bad_outcomes'])}")
    print(f"\nwrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
