"""What a flip and a live migration cost on `--elastic 2` (issue 19), the default model, float32.

Each trial: rank A decodes k requests of a context of L tokens (rank B is set to prefill, so
they all decode on A), then, through POST /v1/cluster/mode, B goes back to mixed and A to prefill,
so A's requests migrate to B. Measured per trial:

- flip to prefill: from the router's flip until the last of them has moved off A (its KV landed
  on B: the server's `pd_local_flip_seconds{to="prefill"}`), and as a client sees it (the POST
  until /v1/cluster shows A decoding nothing);
- flip to mixed: the router applies it to the next placement (0 server side); the client time
  from the POST until /v1/cluster shows the mode;
- each moved request's stall (`pd_local_migration_seconds`: stopped on A -> decoding on B) and
  the KV bytes moved; a least-squares line over L gives the cost per 1k tokens of context.

Once A is empty the trial's clients leave (their requests are aborted), so no trial waits for
its answers to end.

The next trial swaps A and B. Prints a table, writes JSON to --out.

    python benchmarks/elastic_costs.py            # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py
from head_of_line import provenance  # noqa: E402
from servers import start_server, stop_server  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="256,1024,1536", help="prompt lengths, tokens (+ --max-tokens "
                   "within the model's 2048)")
    p.add_argument("--batches", default="1,3", help="requests decoding on the rank that flips")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=400, help="more than a trial lasts")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/elastic_costs.json"))
    p.add_argument("--log", type=Path, default=Path("/tmp/pd-local-elastic-costs.log"))
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[elastic-costs] {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], q: float) -> float:
    """Nearest rank (at n < 100 the p99 is the largest sample)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x; (a, b)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


class Server:
    def __init__(self, c: httpx.AsyncClient, url: str) -> None:
        self.c, self.url = c, url

    async def ranks(self) -> dict[int, dict[str, Any]]:
        return {r["rank"]: r for r in (await self.c.get(f"{self.url}/v1/cluster")).json()["ranks"]}

    async def metric(self, name: str) -> float:
        text = (await self.c.get(f"{self.url}/metrics")).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    async def set_mode(self, rank: int, mode: str) -> float:
        """POST, then wait until /v1/cluster shows it; the seconds that took."""
        t0 = time.monotonic()
        r = await self.c.post(f"{self.url}/v1/cluster/mode", json={"rank": rank, "mode": mode})
        r.raise_for_status()
        while (await self.ranks())[rank]["mode"] != mode:
            await asyncio.sleep(0.005)
        return time.monotonic() - t0

    async def until(self, check: Any, timeout: float = 300.0) -> float:
        t0 = time.monotonic()
        while not check(await self.ranks()):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError("the cluster never reached the state waited for")
            await asyncio.sleep(0.005)
        return time.monotonic() - t0


async def stream(s: Server, prompt: list[int], max_tokens: int, decoding: asyncio.Event) -> None:
    """One streamed request; `decoding` set at its first token; reads until cancelled."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    try:
        async with s.c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()}")
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    decoding.set()
    finally:
        decoding.set()  # also when it failed: the trial raises what it raised


async def trial(s: Server, a: int, context: int, k: int, max_tokens: int, seed: int) -> dict[str, Any]:
    b = 3 - a
    await s.set_mode(b, "prefill")
    prompts = [[1 + (seed * 131 + i * 17 + j * 7) % 30000 for j in range(context)] for i in range(k)]
    decoding = [asyncio.Event() for _ in prompts]
    sent = [asyncio.create_task(stream(s, p, max_tokens, e)) for p, e in zip(prompts, decoding)]
    for e in decoding:  # every request decoding on A (past its prefill)
        await e.wait()
    for t in sent:
        if t.done():
            t.result()  # it failed: say why (a 400 names the problem)
    if (await s.ranks())[a]["running"] != k:
        raise RuntimeError(f"rank {a} should decode all {k} requests: {await s.ranks()}")
    to_mixed = await s.set_mode(b, "mixed")
    before = {m: await s.metric(m) for m in ("pd_local_flip_seconds_sum", "pd_local_flip_seconds_count", "pd_local_migrations_total",
                                             "pd_local_migration_seconds_sum", "pd_local_migration_bytes_total")}
    t0 = time.monotonic()
    (await s.c.post(f"{s.url}/v1/cluster/mode", json={"rank": a, "mode": "prefill"})).raise_for_status()
    await s.until(lambda r: r[a]["mode"] == "prefill" and r[a]["running"] == 0)
    client_s = time.monotonic() - t0
    while await s.metric("pd_local_migrations_total") - before["pd_local_migrations_total"] < k \
            or await s.metric("pd_local_flip_seconds_count") == before["pd_local_flip_seconds_count"]:
        await asyncio.sleep(0.01)  # every move done (its KV landed), and the flip with them
    d = {m: await s.metric(m) - v for m, v in before.items()}
    for t in sent:  # the clients leave: aborted, their blocks freed
        t.cancel()
    await asyncio.gather(*sent, return_exceptions=True)
    while (await s.c.get(f"{s.url}/v1/cluster")).json()["in_flight"]:
        await asyncio.sleep(0.01)
    moves = d["pd_local_migrations_total"]
    return {"rank": a, "context": context, "batch": k, "moved": int(moves),
            "to_prefill_s": d["pd_local_flip_seconds_sum"], "to_prefill_client_s": client_s,
            "to_mixed_client_s": to_mixed, "stall_ms": 1000 * d["pd_local_migration_seconds_sum"] / moves,
            "bytes_per_move": d["pd_local_migration_bytes_total"] / moves}


async def run(url: str, a: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    async with httpx.AsyncClient(timeout=600, trust_env=False) as c:
        s, rank = Server(c, url), 1
        for rep in range(a.repeats):
            for context in map(int, a.contexts.split(",")):
                for k in map(int, a.batches.split(",")):
                    t = await trial(s, rank, context, k, a.max_tokens, seed=len(out))
                    say(f"rep {rep} context {context} batch {k}: to prefill {t['to_prefill_s'] * 1000:.0f} ms "
                        f"(client {t['to_prefill_client_s'] * 1000:.0f}), moved {t['moved']}, "
                        f"stall {t['stall_ms']:.0f} ms/move, {t['bytes_per_move'] / 1e6:.1f} MB/move")
                    out.append(t)
                    rank = 3 - rank
        (await c.post(f"{url}/v1/cluster/mode", json={"rank": 1, "mode": "auto"})).raise_for_status()
    return out


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    def pcts(xs: list[float]) -> dict[str, float]:
        return {"p50_ms": round(percentile(xs, 50) * 1000, 1), "p99_ms": round(percentile(xs, 99) * 1000, 1), "n": len(xs)}
    to_prefill = {str(k): pcts([t["to_prefill_s"] for t in trials if t["batch"] == k])
                  for k in sorted({t["batch"] for t in trials})}
    stalls = [(t["context"], t["stall_ms"]) for t in trials if t["moved"]]
    per_move = [(t["context"], t["bytes_per_move"]) for t in trials if t["moved"]]
    base_ms, ms_per_tok = fit(stalls)
    _, bytes_per_tok = fit(per_move)
    by_context = {str(c): {"stall_p50_ms": round(statistics.median([x for cc, x in stalls if cc == c]), 1),
                           "MB": round(statistics.median([x for cc, x in per_move if cc == c]) / 1e6, 2)}
                  for c in sorted({c for c, _ in stalls})}
    return {"flip_to_prefill": to_prefill,
            "flip_to_prefill_client": pcts([t["to_prefill_client_s"] for t in trials]),
            "flip_to_mixed_client": pcts([t["to_mixed_client_s"] for t in trials]),
            "flip_to_mixed_server_ms": 0.0,
            "migration": {"by_context": by_context, "stall_base_ms": round(base_ms, 1),
                          "stall_ms_per_1k_tokens": round(ms_per_tok * 1000, 1),
                          "MB_per_1k_tokens": round(bytes_per_tok * 1000 / 1e6, 2)}}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    proc, url = start_server("elastic-2", ["--elastic", "2", "--dtype", a.dtype], a.log)
    try:
        trials = asyncio.run(run(url, a))
    finally:
        stop_server(proc)
    summary = summarize(trials)
    print(json.dumps(summary, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"provenance": provenance(), "args": {k: str(v) for k, v in vars(a).items()},
                                 "summary": summary, "trials": trials}, indent=1) + "\n")
    say(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
