"""Is a PD decode rank's ITL growth during a long prefill the prefill rank's CPU use or the
protocol? A control experiment for benchmarks/head_of_line.py on a small shared CPU.

One 1P1D server (SmolLM2 fp32), one stream decoding, no other request: 6-s windows alternate
between "alone" and "with one busy process" (a Python busy loop, standing in for the prefill
rank's compute but sending no KV and touching no rank). If the stream's ITL grows by about as
much with the busy loop as with a real long prefill, the prefill's cost to decode is CPU
contention, not KV landing or messages. Prints and writes JSON.

    python benchmarks/cpu_contention.py [--windows 6] [--window-s 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: servers.py
from servers import REPO, start_server, stop_server  # noqa: E402

from pd_local.loadtest.client import RequestOptions, send_request  # noqa: E402
from pd_local.loadtest.runner import fetch_model  # noqa: E402
from pd_local.loadtest.workloads import KIND_STREAM, RequestSpec  # noqa: E402


async def measure(url: str, windows: int, window_s: float) -> dict[str, dict[str, float]]:
    opts = RequestOptions(url=url + "/v1/chat/completions", model=await fetch_model(url, None, 30),
                          chat=True, ignore_eos=True, timeout=3600)
    spec = RequestSpec(None, [{"role": "user", "content": "the of and " * 13}], 40, 1900,
                       KIND_STREAM)
    spans: list[tuple[float, float, bool]] = []
    async with httpx.AsyncClient(timeout=3600, trust_env=False) as client:
        stop = asyncio.Event()
        t0 = time.perf_counter()
        task = asyncio.create_task(send_request(client, opts, spec, 0, t0, stop))
        await asyncio.sleep(3)  # the stream is decoding
        for i in range(windows):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if i % 2 else None
            a = time.perf_counter() - t0
            await asyncio.sleep(window_s)
            spans.append((a, time.perf_counter() - t0, busy is not None))
            if busy is not None:
                busy.kill()
                busy.wait()
        stop.set()
        res = await task
    if not res.success:
        raise RuntimeError(f"the stream failed: {res.error}")
    ts = [res.start + t for t in res.chunk_times]
    out: dict[str, dict[str, float]] = {}
    for busy, name in ((False, "alone"), (True, "with_busy_loop")):
        gaps = [y - x for a, b, w in spans if w == busy for x, y in zip(ts, ts[1:])
                if x >= a and y <= b]
        out[name] = {"gaps": len(gaps), "median_s": float(np.median(gaps)),
                     "p99_s": float(np.percentile(gaps, 99)), "max_s": max(gaps)}
    out["ratio"] = {k: out["with_busy_loop"][k] / out["alone"][k]
                    for k in ("median_s", "p99_s", "max_s")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/smollm2-135m-instruct-f32")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--window-s", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cpu_contention.json")
    args = ap.parse_args()
    proc, url = start_server("1P1D", ["--model", args.model, "--dtype", "float32", "--prefill",
                                      "1", "--decode", "1"], Path("/tmp/pd_local_contention.log"))
    try:
        result = asyncio.run(measure(url, args.windows, args.window_s))
    finally:
        stop_server(proc)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
