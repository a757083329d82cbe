"""Decode step time, same run: torch's ops, the native decode-row linear, and the native whole layer.

    python benchmarks/native_linear.py [--model DIR] [--dtype auto] [--batches 1,4,16] [--out FILE]
                                       [--kernel-only | --profile]

For each batch size: three engines (torch's kernels; engine.native_linear with decode rows' linears
only; with whole decoder layers, the default where the model allows) prefill the same prompts, then
time decode steps, alternating in rounds so all see the same background load; the figure is the
best round's ms/step and the ratios torch / native (above 1: native is faster). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pd_local.config import EngineConfig
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from pd_local.model.dtype import DTYPE_CHOICES, read_cpu_flags, resolve_dtype_name
from pd_local.model import native_decode
from pd_local.model.native_linear import kernel, load
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


def kernel_only(model, batches: list[int], rounds: int) -> list[dict]:
    """The native kernel alone over every linear of the model (and lm_head), this CPU's build
    against the -mno-avx512bf16 one (fp32 FMAs for bf16 weights), interleaved: ms per pass."""
    builds = {"this_cpu": load(Path(tempfile.mkdtemp())),
              "fma_only": load(Path(tempfile.mkdtemp()), extra_flags=("-mno-avx512bf16",))}
    weights = [m.weight for m in model.modules() if hasattr(m, "panel")] + [model.lm_head_weight]
    panels = {n: [k.pack(w) for w in weights] for n, k in builds.items()}
    gbytes = sum(w.numel() * w.element_size() for w in weights) / 1e9
    rows = []
    for m in batches:
        xs = [torch.randn(m, w.shape[1]).to(w.dtype) for w in weights]
        best = dict.fromkeys(builds, float("inf"))
        for _ in range(rounds):
            for name, k in builds.items():
                t0 = time.perf_counter()
                for x, w, p in zip(xs, weights, panels[name]):
                    k(x, w, None, p)
                best[name] = min(best[name], time.perf_counter() - t0)
        rows.append({"rows": m, **{f"{n}_ms": round(v * 1e3, 2) for n, v in best.items()},
                     **{f"{n}_gb_s": round(gbytes / v, 1) for n, v in best.items()}})
        print(f"kernel alone, {m:3d} rows: this CPU's build {best['this_cpu'] * 1e3:6.2f} ms  "
              f"FMA-only build {best['fma_only'] * 1e3:6.2f} ms", flush=True)
    return rows


def profile(model, batches: list[int], prompt_len: int, steps: int) -> list[dict]:
    """Where a decode step's time goes with whole native layers: the kernel's own counters
    (linears, attention, layers) against the step's wall time; GB/s over the weights read."""
    nk = kernel()
    layer_bytes = sum(m.panel.get(nk, m.weight).nbytes for m in native_decode.layer_linears(model))
    head = model.lm_head_weight
    head_bytes = head.numel() * head.element_size()
    rows = []
    for batch in batches:
        eng = started_engine(model, batch, True, prompt_len, steps * 2)
        ms_per_step(eng, 3)  # warm
        nk.profile(True)
        step_ms = ms_per_step(eng, steps)
        c = {k: v / steps * 1e3 for k, v in nk.profile(False).items()}  # ms per step
        native_bytes = layer_bytes + (head_bytes if model.native_decode else 0)  # lm_head: native or oneDNN
        row = {"batch": batch, "step_ms": round(step_ms, 2), "linear_ms": round(c["linear_s"], 2),
               "attention_ms": round(c["attention_s"], 2),
               "layers_ms": round(c["layers_s"], 2),
               "outside_layers_ms": round(step_ms - c["layers_s"], 2),
               "linear_share": round(c["linear_s"] / step_ms, 3),
               "linear_gb_s": round(native_bytes / c["linear_s"] / 1e6, 1),
               "step_gb_s": round((layer_bytes + head_bytes) / step_ms / 1e6, 1)}
        rows.append(row)
        print(f"batch {batch:3d}: step {step_ms:6.2f} ms; native linears {c['linear_s']:6.2f} ms "
              f"({100 * row['linear_share']:.0f}%, {row['linear_gb_s']} GB/s), attention {c['attention_s']:.2f} ms, "
              f"outside the layer kernel {row['outside_layers_ms']} ms; weights at {row['step_gb_s']} GB/s "
              "over the whole step", flush=True)
    return rows


def compare(model, batches: list[int], prompt_len: int, steps: int, rounds: int) -> list[dict]:
    """Decode steps through torch's ops, the per-linear native path and whole native layers,
    interleaved in rounds: the best round's ms per step, and the ratios."""
    model.set_native_decode(True)
    layers = model.decode_layers
    if layers is None:
        print("this model cannot take the whole-layer kernel: its column is the per-linear path", file=sys.stderr)
    variants = {"torch": (False, None), "linear": (True, None), "layers": (True, layers)}
    rows = []
    for batch in batches:
        engines = {n: started_engine(model, batch, n != "torch", prompt_len, steps * rounds) for n in variants}
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(rounds):
            for name, eng in engines.items():
                model.native_decode, model.decode_layers = variants[name]  # the engines share the model
                best[name] = min(best[name], ms_per_step(eng, steps))
        rows.append({"batch": batch, **{f"{n}_ms": round(v, 2) for n, v in best.items()},
                     "torch/linear": round(best["torch"] / best["linear"], 2),
                     "torch/layers": round(best["torch"] / best["layers"], 2)})
        print(f"batch {batch:3d}: ms/step torch {best['torch']:6.1f}  native linear {best['linear']:6.1f}  "
              f"native layers {best['layers']:6.1f}  torch/linear {rows[-1]['torch/linear']:.2f}x  "
              f"torch/layers {rows[-1]['torch/layers']:.2f}x", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/native_linear.json")
    ap.add_argument("--profile", action="store_true",
                    help="where a whole-layer decode step's time goes (the kernel's own counters)")
    ap.add_argument("--kernel-only", action="store_true",
                    help="time the kernel alone over the model's linears (this CPU's build vs FMA-only)")
    args = ap.parse_args()
    if kernel() is None:
        print("the native kernel is unavailable here (see the warning above)", file=sys.stderr)
        return 1
    dtype_name, why = resolve_dtype_name(args.dtype, "cpu", read_cpu_flags())
    model, _ = load_model(args.model, getattr(torch, dtype_name))
    batches = [int(b) for b in args.batches.split(",")]
    out = {"dtype": dtype_name, "dtype_reason": why, "threads": torch.get_num_threads(), "cpu": cpu_kind(),
           "prompt_len": args.prompt_len, "date": time.strftime("%Y-%m-%d")}
    if args.kernel_only:
        out["kernel_rows"] = kernel_only(model, batches, args.rounds)
    elif args.profile:
        model.set_native_decode(True)
        out["profile_rows"] = profile(model, batches, args.prompt_len, args.steps * args.rounds)
    else:
        out["rows"] = compare(model, batches, args.prompt_len, args.steps, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
