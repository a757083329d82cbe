"""Chunked prefill in a colocated engine, in-process: what a long prompt costs a running stream.

Scenario (as in the issue): one stream decoding, then a ~1700-token prompt and 3 short chats
arrive together. Per engine config, interleaved rounds on the same machine:
- the running stream's largest gap between two tokens while the long prompt prefills;
- the long prompt's TTFT and the short chats' TTFT (the queue's head-of-line blocking);
- the prefill throughput cost: the long prompt prefilled alone, chunked / unchunked (CPU time);
- the cost of exactness: one-shot prefill with the chunk-invariant tiled attention / with one
  SDPA flash call per prompt (the attention before chunked prefill).
Figures are ratios within one run, in CPU seconds of this process as well as wall seconds (the
dev machines are shared: wall time there mostly measures the neighbours). Prints, writes JSON.

    python benchmarks/chunked_prefill.py [--model DIR] [--dtype float32] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import pd_local.model.llama as llama_mod
from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.model.weights import load_model
from pd_local.engine.sampling import SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
CONFIGS = {  # name -> (max_prefill_tokens, chunked_prefill, prefill_policy)
    "whole": (4096, False, "fcfs"),
    "chunk256-fcfs": (256, True, "fcfs"),
    "chunk256-srpf": (256, True, "srpf"),
}


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 49000, (n,), generator=g).tolist()


def clocks() -> tuple[float, float]:
    """(wall, this process's CPU time): on a shared machine with one thread, CPU seconds are the
    work done, unaffected by waiting for a core; wall seconds are what a user would see."""
    return time.perf_counter(), time.process_time()


def interference(model, cfg: tuple[int, bool, str], long_len: int) -> dict[str, float]:
    budget, chunked, policy = cfg
    eng = Engine(model, EngineConfig(num_blocks=512, max_num_seqs=8, max_prefill_tokens=budget,
                                     chunked_prefill=chunked, prefill_policy=policy))
    stream = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    eng.add_request(0, prompt(32, 0), stream)
    for _ in range(4):  # the stream is decoding
        eng.step()
    t0 = clocks()
    eng.add_request(1, prompt(long_len, 1), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    for i in range(3):
        eng.add_request(2 + i, prompt(40, 2 + i), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    first: dict[int, tuple[float, float]] = {}
    last = t0
    gaps: list[tuple[float, float]] = []
    while len(first) < 4:
        for ev in eng.step():
            now = clocks()
            if ev.req_id == 0:
                gaps.append((now[0] - last[0], now[1] - last[1]))
                last = now
            elif ev.req_id not in first:
                first[ev.req_id] = (now[0] - t0[0], now[1] - t0[1])
    eng.abort(0)
    out: dict[str, float] = {"stream_tokens_during": len(gaps)}
    for i, clock in enumerate(("wall", "cpu")):
        out[f"stream_max_gap_{clock}_s"] = max(g[i] for g in gaps)
        out[f"stream_median_gap_{clock}_s"] = statistics.median(g[i] for g in gaps)
        out[f"long_ttft_{clock}_s"] = first[1][i]
        out[f"short_ttft_mean_{clock}_s"] = statistics.mean(first[r][i] for r in (2, 3, 4))
    return out


def prefill_alone(model, budget: int, chunked: bool, long_len: int) -> float:
    """CPU seconds to prefill the long prompt alone and sample its first token."""
    eng = Engine(model, EngineConfig(num_blocks=512, max_prefill_tokens=budget, chunked_prefill=chunked))
    t0 = time.process_time()
    eng.generate([prompt(long_len, 1)], SamplingParams(temperature=0, max_tokens=1))
    return time.process_time() - t0


def sdpa_one_shot(q, k, v, meta, k_cache, v_cache, scale):
    """The attention before chunked prefill: one SDPA flash call per whole prompt (no prefix)."""
    out = torch.empty_like(q)
    start = 0
    for n in meta.seq_lens:
        qs, ks, vs = (x[start:start + n].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[start:start + n] = o[0].transpose(0, 1)
        start += n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="1 = what a torchrun rank gets")
    ap.add_argument("--long-len", type=int, default=1700)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/chunked_prefill.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or ("weights/smollm2-135m-instruct-f32" if args.dtype == "float32"
                               else "weights/smollm2-135m-instruct")
    model, _ = load_model(model_dir, DTYPES[args.dtype])

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    alone: dict[str, list[float]] = {"whole": [], "chunk256": [], "whole_sdpa": []}
    tiled = llama_mod.prefill_attention
    for r in range(args.rounds):
        for name, cfg in CONFIGS.items():
            runs[name].append(interference(model, cfg, args.long_len))
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
        alone["whole"].append(prefill_alone(model, 4096, False, args.long_len))
        alone["chunk256"].append(prefill_alone(model, 256, True, args.long_len))
        llama_mod.prefill_attention = sdpa_one_shot
        try:
            alone["whole_sdpa"].append(prefill_alone(model, 4096, False, args.long_len))
        finally:
            llama_mod.prefill_attention = tiled
        print(f"round {r} alone (cpu s): { {k: round(v[-1], 3) for k, v in alone.items()} }", flush=True)

    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    best = {k: min(v) for k, v in alone.items()}
    ratios: dict[str, float] = {}
    for clock in ("cpu", "wall"):
        whole_ttft = med["whole"][f"long_ttft_{clock}_s"]  # L: the long prompt's TTFT, unchunked
        for n in med:
            for metric in ("stream_max_gap", "short_ttft_mean", "long_ttft"):
                ratios[f"{clock}: {n}.{metric} / L"] = med[n][f"{metric}_{clock}_s"] / whole_ttft
    ratios["cpu: prefill alone, chunk256 / whole"] = best["chunk256"] / best["whole"]
    ratios["cpu: prefill alone whole, tiled attention / sdpa one-shot"] = best["whole"] / best["whole_sdpa"]
    result = {
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "model": model_dir, "dtype": args.dtype, "threads": args.threads, "long_len": args.long_len,
        "rounds": args.rounds, "median": med, "alone_best_cpu_s": best, "ratios": ratios,
    }
    print(json.dumps(result["ratios"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
