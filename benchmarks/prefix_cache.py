"""Prefix caching, on vs off in the same run: 1P1D and colocated-1, SmolLM2 float32.

For each topology, two servers in turn, identical but for `[engine] enable_prefix_caching`
(written into a config file passed with `pd-local serve --config`):

(a) one conversation behind a ~1200-token system prompt (random words from the load tool's
    one-token-each list, so words = tokens): turn 1, then turn 2 carrying turn 1's streamed
    answer. Per turn: client TTFT, prompt tokens (server usage) and the KV bytes moved
    (`pd_local_kv_transfer_bytes_total` from /metrics read before and after the turn;
    colocated moves none). Repeated `--repeats` times, each with its own system prompt (a cold
    turn 1 every time); medians reported.
(b) the load tool's multiturn workload (`pd_local.loadtest.conversation`): conversations of
    `--turns` turns sharing one system prompt; TTFT p50/p90 overall and by turn, KV bytes moved.

Every request is greedy; the texts with the cache on must equal those with it off (checked,
reported as `texts_identical`). Any /metrics counter whose name mentions "prefix" or "cache"
(the engine's hit counters, when present) is recorded as a before/after delta too.

Ratios printed: turn2/turn1 TTFT and bytes per setting, and on/off for each figure. The
issue's targets: turn-2 TTFT <= 0.4x turn 1, turn-2 bytes <= 0.25x turn 1, identical text.

`--topologies 1p2d-load,1p2d-prefix` compares the routing policies the same way (with 2 decode
ranks, `prefix` routing keeps a conversation where its KV is; the multiturn figures show it).

    python benchmarks/prefix_cache.py [--quick] [--repeats 3] [--topologies ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import REPO, start_server, stop_server  # noqa: E402

from pd_local.loadtest.client import RequestOptions, send_request  # noqa: E402
from pd_local.loadtest.conversation import (  # noqa: E402
    Conversation, make_conversations, per_turn, run_conversations, turn_spec,
)
from pd_local.loadtest.runner import RunOptions, fetch_model, make_client  # noqa: E402
from pd_local.loadtest.workloads import WorkloadConfig, random_words  # noqa: E402

TOPOLOGIES = {"1p1d": ["--prefill", "1", "--decode", "1"], "colocated-1": ["--colocated", "1"],
              # not run by default: the routing policies compared (--topologies 1p2d-load,1p2d-prefix)
              "1p2d-load": ["--prefill", "1", "--decode", "2", "--routing", "load"],
              "1p2d-prefix": ["--prefill", "1", "--decode", "2", "--routing", "prefix"]}
DEFAULT_TOPOLOGIES = "1p1d,colocated-1"
BYTES = "pd_local_kv_transfer_bytes_total"
F32 = REPO / "weights" / "smollm2-135m-instruct-f32"


def write_config(dirpath: Path, cache: bool, max_len: int) -> Path:
    path = dirpath / f"prefix_cache_{'on' if cache else 'off'}.toml"
    model = F32 if F32.exists() else REPO / "weights" / "smollm2-135m-instruct"
    path.write_text(f'model = "{model}"\ndtype = "float32"\n\n[engine]\n'
                    f"enable_prefix_caching = {'true' if cache else 'false'}\n"
                    f"max_model_len = {max_len}\n")
    return path


def counters(url: str) -> dict[str, float]:
    """The KV bytes counter and every counter/gauge mentioning prefix or cache, summed per name
    over labels (per-rank series add up to the server's)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text.splitlines():
        if line.startswith("#") or not line.startswith("pd_local_"):
            continue
        key, _, val = line.rpartition(" ")
        name = key.split("{")[0]
        if name == BYTES or "prefix" in name or "cache" in name:
            out[name] = out.get(name, 0.0) + float(val)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


async def single(url: str, opts: RunOptions, args: argparse.Namespace) -> dict[str, Any]:
    """(a): `--repeats` two-turn conversations, each behind its own system prompt."""
    rng = np.random.default_rng(11)
    rows: list[dict[str, Any]] = []
    async with make_client(opts) as client:
        for rep in range(args.repeats):
            conv = Conversation(rep, random_words(rng, args.system_len),
                                (random_words(rng, args.user_len),
                                 random_words(rng, args.user_len)), (args.user_len,) * 2,
                                args.output_len)
            answers: list[str] = []
            row: dict[str, Any] = {}
            for turn in (1, 2):
                before = counters(url)
                res = await send_request(client, opts.request, turn_spec(conv, answers, turn),
                                         turn, 0.0)
                if not res.success:
                    raise RuntimeError(f"turn {turn} failed: {res.error}")
                await asyncio.sleep(0.2)  # the transfer record rides on a later Tokens message
                d = delta(before, counters(url))
                answers.append(res.text)
                row[f"turn{turn}"] = {"ttft_ms": res.ttft * 1000.0, "prompt_tokens": res.input_len,
                                      "kv_bytes": d.pop(BYTES, 0.0), "counters": d,
                                      "text": res.text}
            rows.append(row)
    med = {f"turn{t}_{k}": statistics.median(r[f"turn{t}"][k] for r in rows)
           for t in (1, 2) for k in ("ttft_ms", "prompt_tokens", "kv_bytes")}
    med["ttft_ratio"] = ratio(med["turn2_ttft_ms"], med["turn1_ttft_ms"])
    med["bytes_ratio"] = ratio(med["turn2_kv_bytes"], med["turn1_kv_bytes"])
    return {**med, "repeats": rows}


async def multiturn(url: str, opts: RunOptions, args: argparse.Namespace) -> dict[str, Any]:
    """(b): the load tool's multiturn workload, shared system prompt."""
    cfg = WorkloadConfig(name="multiturn", input_len=args.user_len, output_len=args.output_len,
                         turns=args.turns, think_time=args.think_time,
                         system_len=args.system_len, shared_system=True)
    convs = make_conversations(cfg, args.conv_rate, 1.0, args.conversations, None, seed=5)
    before = counters(url)
    run = await run_conversations(convs, opts, cfg.think_time)
    await asyncio.sleep(0.2)
    d = delta(before, counters(url))
    failed = [r.error for r in run.results if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} multiturn requests failed, first: {failed[0]}")
    ttft = [r.ttft * 1000.0 for r in run.results]
    return {"requests": len(run.results), "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p90_ms": float(np.percentile(ttft, 90)), "kv_bytes": d.pop(BYTES, 0.0),
            "counters": d, "per_turn": per_turn(run.results),
            "texts": {f"{r.conversation}.{r.turn}": r.text for r in run.results}}


def measure(topology: str, cache: bool, cfg_path: Path, args: argparse.Namespace
            ) -> dict[str, Any]:
    name = f"{topology}-cache-{'on' if cache else 'off'}"
    print(f"[bench] starting {name} ...", file=sys.stderr, flush=True)
    proc, url = start_server(name, ["--config", str(cfg_path), *TOPOLOGIES[topology]],
                             Path(f"/tmp/pd_local_bench_{name}.log"), timeout_s=300)
    try:
        model = asyncio.run(fetch_model(url, None, 30.0))
        opts = RunOptions(RequestOptions(url=url + "/v1/chat/completions", model=model, chat=True,
                                         timeout=600, extra_body={"temperature": 0}))
        warm = Conversation(-1, None, ("hello there, who are you",), (5,), 4)
        asyncio.run(_warm(opts, warm))
        out = {"single": asyncio.run(single(url, opts, args)),
               "multiturn": asyncio.run(multiturn(url, opts, args))}
    finally:
        stop_server(proc)
    s, m = out["single"], out["multiturn"]
    print(f"[bench] {name}: turn1 {s['turn1_ttft_ms']:.0f} ms, turn2 {s['turn2_ttft_ms']:.0f} ms; "
          f"multiturn p50 {m['ttft_p50_ms']:.0f} ms", file=sys.stderr, flush=True)
    return out


async def _warm(opts: RunOptions, conv: Conversation) -> None:
    async with make_client(opts) as client:
        res = await send_request(client, opts.request, turn_spec(conv, [], 1), 0, 0.0)
    if not res.success:
        raise RuntimeError(f"warm-up failed: {res.error}")


def _f(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| topology | cache | t1 TTFT ms | t2 TTFT ms | t2/t1 TTFT | t1 KV bytes | t2 KV bytes "
            "| t2/t1 bytes | multiturn TTFT p50 / p90 ms | multiturn KV bytes | texts on = off |")
    lines = [head, "|" + "---|" * 11]
    for topo, per in results.items():
        for setting in ("on", "off"):
            s, m = per[setting]["single"], per[setting]["multiturn"]
            lines.append(
                f"| {topo} | {setting} | {_f(s['turn1_ttft_ms'])} | {_f(s['turn2_ttft_ms'])} | "
                f"{_f(s['ttft_ratio'], '.2f')} | {_f(s['turn1_kv_bytes'])} | "
                f"{_f(s['turn2_kv_bytes'])} | {_f(s['bytes_ratio'], '.2f')} | "
                f"{_f(m['ttft_p50_ms'])} / {_f(m['ttft_p90_ms'])} | {_f(m['kv_bytes'])} | "
                f"{per['texts_identical']} |")
        on, off = per["on"], per["off"]
        lines.append(
            f"| {topo} | on/off | {_f(ratio(on['single']['turn1_ttft_ms'], off['single']['turn1_ttft_ms']), '.2f')} | "
            f"{_f(ratio(on['single']['turn2_ttft_ms'], off['single']['turn2_ttft_ms']), '.2f')} | | "
            f"{_f(ratio(on['single']['turn1_kv_bytes'], off['single']['turn1_kv_bytes']), '.2f')} | "
            f"{_f(ratio(on['single']['turn2_kv_bytes'], off['single']['turn2_kv_bytes']), '.2f')} | | "
            f"{_f(ratio(on['multiturn']['ttft_p50_ms'], off['multiturn']['ttft_p50_ms']), '.2f')} / "
            f"{_f(ratio(on['multiturn']['ttft_p90_ms'], off['multiturn']['ttft_p90_ms']), '.2f')} | "
            f"{_f(ratio(on['multiturn']['kv_bytes'], off['multiturn']['kv_bytes']), '.2f')} | |")
    return "\n".join(lines)


def texts(run: dict[str, Any]) -> dict[str, str]:
    out = {f"single.{i}.{t}": r[t]["text"] for i, r in enumerate(run["single"]["repeats"])
           for t in ("turn1", "turn2")}
    out.update({f"multiturn.{k}": v for k, v in run["multiturn"]["texts"].items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 200-token system prompt, 1 repeat, 2 conversations of 2 "
                         "turns, 8 output tokens (checks the script end to end, not the cache)")
    ap.add_argument("--topologies", default=DEFAULT_TOPOLOGIES,
                    help=f"comma-separated, of {', '.join(TOPOLOGIES)} (default {DEFAULT_TOPOLOGIES})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--system-len", type=int, default=1200)
    ap.add_argument("--user-len", type=int, default=40)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--think-time", type=float, default=0.5)
    ap.add_argument("--conv-rate", type=float, default=0.5, help="conversations started per s")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/prefix_cache.json"))
    args = ap.parse_args()
    unknown = [t for t in args.topologies.split(",") if t not in TOPOLOGIES]
    if unknown:
        ap.error(f"--topologies: unknown {', '.join(unknown)} (known: {', '.join(TOPOLOGIES)})")
    if args.quick:
        args.repeats, args.system_len, args.output_len = 1, 200, 8
        args.conversations, args.turns, args.user_len, args.think_time = 2, 2, 10, 0.1
        args.conv_rate = 2.0
    max_len = args.system_len + args.turns * (args.user_len + args.output_len) * 2 + 256
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pd_local_prefix_cache_") as tmp:
        for topo in args.topologies.split(","):
            per: dict[str, Any] = {}
            for cache in (True, False):
                per["on" if cache else "off"] = measure(
                    topo, cache, write_config(Path(tmp), cache, max_len), args)
            a, b = texts(per["on"]), texts(per["off"])
            per["texts_identical"] = a == b
            per["texts_differing"] = sorted(k for k in a if a[k] != b.get(k))
            on = per["on"]["single"]
            per["targets_met"] = {  # the issue's, for the cache-on server
                "turn2_ttft_le_0.4x_turn1": (on["ttft_ratio"] or 9.0) <= 0.4,
                "turn2_bytes_le_0.25x_turn1": None if on["bytes_ratio"] is None
                else on["bytes_ratio"] <= 0.25,
                "identical_text": per["texts_identical"]}
            results[topo] = per
    print(table(results))
    if not all(per["texts_identical"] for per in results.values()):
        print("WARNING: texts differ between cache on and off: "
              + "; ".join(f"{t}: {per['texts_differing']}" for t, per in results.items()
                          if not per["texts_identical"]), file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0 if all(per["texts_identical"] for per in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
