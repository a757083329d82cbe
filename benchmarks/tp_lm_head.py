"""lm_head under tensor parallel on CPU (issue 21: "vocab-parallel or gathered, whichever you
measure as better"): SmolLM2's lm_head shape (vocab 49152 x hidden 576, fp32), rows B = 1, 8 and
64 (decode batches and a prefill chunk's last rows), over torchrun + gloo on the same cores:

- replicated (what model/tp.py does): every rank computes every logit, no collective;
- vocab-parallel: each rank computes its half of the vocabulary, then an all-gather of the
  logits over gloo, so every rank samples from the whole row;
- TP 1 on 2 threads, the same cores' single-rank peer.

Prints ms per call (medians) and writes JSON to --out.

    python benchmarks/tp_lm_head.py         # ~1 min on 2 CPU cores
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

VOCAB, HIDDEN, ROWS = 49152, 576, (1, 8, 64)


def timed(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


def rank_main(reps: int) -> None:
    import torch
    import torch.distributed as dist

    from pd_local.model.layers import PackedWeight, linear

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN) * 0.02
    mine = w.chunk(world)[rank].contiguous()
    packed_w, packed_mine = PackedWeight(), PackedWeight()
    res = {}
    for b in ROWS:
        x = torch.randn(b, HIDDEN)
        dist.barrier()
        res[f"replicated B={b}"] = timed(lambda: linear(x, w, packed=packed_w), reps)

        def vocab_parallel() -> torch.Tensor:
            part = linear(x, mine, packed=packed_mine)  # [B, V / world]
            parts = [torch.empty_like(part) for _ in range(world)]
            dist.all_gather(parts, part)
            return torch.cat(parts, dim=1)  # [B, V]

        dist.barrier()
        res[f"vocab-parallel B={b}"] = timed(vocab_parallel, reps)
        got = vocab_parallel()
        assert torch.allclose(got, linear(x, w), atol=1e-4), "vocab-parallel logits differ"
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


def single(reps: int) -> dict[str, float]:
    import torch

    from pd_local.model.layers import PackedWeight, linear

    torch.set_num_threads(2)
    torch.manual_seed(0)
    w, packed = torch.randn(VOCAB, HIDDEN) * 0.02, PackedWeight()
    return {f"TP 1, 2 threads B={b}": timed(lambda x=torch.randn(b, HIDDEN): linear(x, w, packed=packed), reps)
            for b in ROWS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/tp_lm_head.json")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        rank_main(args.reps)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          __file__, "--rank", "--reps", str(args.reps)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if run.returncode or line is None:
        sys.exit(f"the TP 2 run failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    res = {**json.loads(line[7:]), **single(args.reps)}
    print(f"{'setting':32} {'ms':>8}")
    for k, v in res.items():
        print(f"{k:32} {v:8.2f}")
    for b in ROWS:
        peer = res[f"TP 1, 2 threads B={b}"]
        print(f"B={b}: replicated {peer / res[f'replicated B={b}']:.2f}x, vocab-parallel "
              f"{peer / res[f'vocab-parallel B={b}']:.2f}x the speed of TP 1 on 2 threads")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ms": res, "shape": [VOCAB, HIDDEN], "dtype": "float32",
                                    "provenance": provenance()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
