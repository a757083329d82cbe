"""Step time of tensor parallel (model/tp.py, issue 21) on CPU: a SmolLM2-sized Llama (random
weights: SmolLM2's 9 heads do not split over 2 ranks; 16 heads, 8 KV heads, hidden 1024, 8
layers, 133M parameters) through an Engine on every rank in lockstep (torchrun + gloo), TP 1 on 1 and on 2 threads, TP 2 on 1 thread per rank
(the same 2 cores). Per setting: a 512-token prefill step and a decode step at batch 1 and 8
(medians). Prints a table and the ratios to TP 1 on 2 threads (the peer on the same cores),
writes JSON to --out. This machine has 2 cores: TP 2 here shows the all-reduce's cost, not a
large model's gain (each rank streams half the weights, the point of TP on GPUs).

    python benchmarks/tp_step.py            # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_of_line import provenance  # noqa: E402

SYNTHETIC = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 1024,
             "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 8, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": True}
SETTINGS = (("TP 1, 1 thread", 1, 1), ("TP 1, 2 threads", 1, 2), ("TP 2, 1 thread a rank", 2, 1))


def measure(model_dir: str, dtype: str, steps: int) -> dict[str, float]:
    """On every rank of the torchrun world: the medians in ms (rank 0 prints them)."""
    import torch
    import torch.distributed as dist

    from pd_local.config import EngineConfig
    from pd_local.engine.engine import Engine
    from pd_local.engine.sampling import SamplingParams
    from pd_local.model.config import ModelConfig
    from pd_local.model.llama import LlamaForCausalLM
    from pd_local.model.tp import shard
    from pd_local.model.weights import load_model

    dist.init_process_group("gloo")
    rank, tp = dist.get_rank(), dist.get_world_size()
    if model_dir == "synthetic":
        torch.manual_seed(0)
        model = LlamaForCausalLM(ModelConfig.from_dict(SYNTHETIC))
        for w in model.parameters():
            torch.nn.init.normal_(w, std=0.02)
        model = model.to(getattr(torch, dtype)).eval().fuse_projections()
    else:
        model = load_model(model_dir, getattr(torch, dtype))[0]
    model = shard(model, rank, tp)
    cfg = EngineConfig(kv_cache_gb=0.2, max_prefill_tokens=512, max_num_seqs=8, native_linear=False)
    engine = Engine(model, cfg)
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)

    def timed() -> float:
        dist.barrier()
        t0 = time.perf_counter()
        engine.step()
        return (time.perf_counter() - t0) * 1e3

    out: dict[str, float] = {}
    prefill = []
    for i in range(3):
        engine.add_request(100 + i, [1 + (7 * j + i) % 4000 for j in range(512)], params)
        prefill.append(timed())  # one 512-token prompt per step, nothing else running
        engine.abort(100 + i)
    out["prefill_512_ms"] = statistics.median(prefill)
    for batch in (1, 8):
        for i in range(batch):
            engine.add_request(i, [1 + (11 * j + i) % 4000 for j in range(64)], params)
        while engine.prefill_backlog()[0]:
            engine.step()
        out[f"decode_b{batch}_ms"] = statistics.median(timed() for _ in range(steps))
        for i in range(batch):
            engine.abort(i)
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()
    return out


def run(tp: int, threads: int, a: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
           __file__, "--rank-side", "--model", a.model, "--dtype", a.dtype, "--steps", str(a.steps)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"tp {tp}: failed\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic", help="a model directory, or synthetic (default)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tp_step.json")
    p.add_argument("--rank-side", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rank_side:
        measure(a.model, a.dtype, a.steps)
        return 0
    rows = {name: run(tp, threads, a) for name, tp, threads in SETTINGS}
    peer = rows["TP 1, 2 threads"]
    print("| setting | prefill 512 (ms) | decode b1 (ms) | decode b8 (ms) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f} ({peer[k] / r[k]:.2f}x)" for k in
                                        ("prefill_512_ms", "decode_b1_ms", "decode_b8_ms")) + " |")
    print("(x: speed relative to TP 1 on 2 threads, the same cores)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"provenance": provenance(), "model": a.model, "dtype": a.dtype,
                                 "settings": rows}, indent=1))
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
