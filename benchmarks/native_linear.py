"""Decode step time with the native decode-row linear (engine.native_linear) vs torch's, same run.

    python benchmarks/native_linear.py [--model DIR] [--dtype auto] [--batches 1,4,16] [--out FILE]

For each batch size: both engines prefill the same prompts, then time decode steps, alternating
between them in rounds so both see the same background load; the figure is the best round's
ms/step and the ratio torch / native (above 1: native is faster). Writes JSON, prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from pd_local.model.dtype import DTYPE_CHOICES, read_cpu_flags, resolve_dtype_name
from pd_local.model.native_linear import kernel
from pd_local.model.weights import load_model

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_transformers import cpu_kind  # noqa: E402


def started_engine(model, batch: int, native: bool, prompt_len: int, steps: int) -> Engine:
    cfg = EngineConfig(num_blocks=batch * ((prompt_len + steps + 64) // 16 + 2), max_num_seqs=batch,
                       max_prefill_tokens=prompt_len * batch, max_model_len=prompt_len + steps + 64,
                       native_linear=native)
    eng = Engine(model, cfg)
    params = SamplingParams(temperature=0, max_tokens=steps + 60, ignore_eos=True)
    prompt = [(7 * i) % 1000 + 100 for i in range(prompt_len)]
    for i in range(batch):
        eng.add_request(i, prompt, params)
    started: set[int] = set()
    while len(started) < batch:
        started.update(ev.req_id for ev in eng.step())
    return eng


def ms_per_step(eng: Engine, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/native_linear.json")
    args = ap.parse_args()
    if kernel() is None:
        print("the native kernel is unavailable here (see the warning above)", file=sys.stderr)
        return 1
    dtype_name, why = resolve_dtype_name(args.dtype, "cpu", read_cpu_flags())
    model, _ = load_model(args.model, getattr(torch, dtype_name))
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        engines = {n: started_engine(model, batch, n, args.prompt_len, args.steps * args.rounds) for n in (False, True)}
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.rounds):
            for native, eng in engines.items():
                model.native_decode = native  # the engines share the model
                best[native] = min(best[native], ms_per_step(eng, args.steps))
        rows.append({"batch": batch, "torch_ms": round(best[False], 2), "native_ms": round(best[True], 2),
                     "speedup": round(best[False] / best[True], 2)})
        print(f"batch {batch:3d}: torch {best[False]:6.1f} ms/step  native {best[True]:6.1f} ms/step  "
              f"torch/native {best[False] / best[True]:.2f}x", flush=True)
    out = {"dtype": dtype_name, "dtype_reason": why, "threads": torch.get_num_threads(), "cpu": cpu_kind(),
           "prompt_len": args.prompt_len, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
