"""Raw torch.distributed p2p vs pd_local's KV transfer, on one (prefill, decode) link.

    python benchmarks/transfer_bandwidth.py [--tokens 128 512 2048] [--iters 5]
        [--out benchmarks/results/transfer_bandwidth.json] [--device cpu]

Re-launches itself under torchrun (3 ranks, 1P1D: rank 0 idles, rank 1 sends, rank 2 receives)
and, in the same run, measures:

- control latency: one-way time of an 8-word tensor (ping-pong / 2) on a gloo control link, and
  of a framed channel message (channel.Sender / recv_message) against a length-prefixed one
  (a size send, then the payload), at a short and a long message;
- raw bandwidth: one contiguous tensor of the transfer's size on the data link;
- effective bandwidth of cluster/transfer.py, layerwise (61 tensors: K and V per layer, then hidden)
  and whole (2 tensors), counting KV + hidden bytes, from KVSender.start() until the receiver
  has handed the last item to its inbox (acknowledged on the default group, as in the raw case);
- the same two with a stand-in compute (an MLP-sized matmul) after each layer, as on a prefill
  rank: how much transfer time is left exposed once the compute ends (what adds to TTFT).

SmolLM2-135M shapes: 30 layers, 3 KV heads, head_dim 64, hidden 576, bf16 (23,040 B/token).
The three cases run interleaved, --iters rounds after one warm-up round, so load from other
processes falls on all of them alike; medians and minima are reported. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/transfer_bandwidth.json")
    return p.parse_args(argv)


def relaunch(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           __file__, *argv]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.call(cmd, env=env)


def run_rank(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pd_local.config import load_config
    from pd_local.cluster.dist import init_distributed
    from pd_local.launch import setup_logging
    from pd_local.cluster.channel import FRAME_WORDS, Inbox, Sender, recv_message
    from pd_local.cluster.messages import KVEntry, Prefill, TransferMode, pack, unpack
    from pd_local.cluster.transfer import KVReceiver, KVSender, KVShape, StagingDone

    setup_logging(os.environ.get("RANK", "?"))
    cfg = load_config(None, {"device": args.device, "timeouts.group_s": 120})
    ctx = init_distributed(cfg)
    rank = ctx.rank
    shape = KVShape(num_layers=30, num_kv_heads=3, head_dim=64, hidden_size=576,
                    dtype=torch.bfloat16)
    results: dict = {}
    if rank == 0:
        dist.barrier()
        return

    pair = ctx.links.kv[(1, 2)]
    header, data = pair.header, pair.data
    ack = torch.zeros(1, dtype=torch.int64)
    sending = rank == 1

    def wait_ack() -> None:  # receiver -> sender on the default group: "all of it arrived"
        if sending:
            dist.recv(ack, 2)
        else:
            dist.send(ack, 1)

    # 1. control latency on the header link (gloo, CPU): raw tensor ping-pong needs both
    # directions, so use the data link's group for the pong when it is gloo, else default.
    def pingpong(words: int, n: int = 500) -> float:
        t = torch.zeros(words, dtype=torch.int64)
        t0 = time.perf_counter()
        for _ in range(n):
            if sending:
                dist.send(t, 2, group=header.group)
                dist.recv(t, 2)
            else:
                dist.recv(t, 1, group=header.group)
                dist.send(t, 1)
        return (time.perf_counter() - t0) / n / 2

    results["p2p_one_way_us"] = {str(w): pingpong(w) * 1e6 for w in (8, 256, 512, 4096)}

    def channel_one_way(msg_words: int, framed: bool, n: int = 300) -> float:
        msg = Prefill(1, tuple(range(msg_words - 4)), 2)  # encodes to msg_words words
        sender = Sender(header) if sending else None
        t0 = time.perf_counter()
        for _ in range(n):
            if sending:
                if framed:
                    sender.send(msg)
                else:  # length-prefixed: size, then exactly the payload
                    payload = pack(msg)
                    dist.send(torch.tensor([payload.numel()]), 2, group=header.group)
                    dist.send(payload, 2, group=header.group)
                dist.recv(ack, 2)
            else:
                if framed:
                    recv_message(header)
                else:
                    size = torch.zeros(1, dtype=torch.int64)
                    dist.recv(size, 1, group=header.group)
                    payload = torch.empty(int(size), dtype=torch.int64)
                    dist.recv(payload, 1, group=header.group)
                    unpack(payload)
                dist.send(ack, 1)
        return (time.perf_counter() - t0) / n

    results["channel_round_trip_us"] = {
        f"{w}_words_{'framed' if framed else 'length_prefixed'}": channel_one_way(w, framed) * 1e6
        for w in (20, 1000) for framed in (True, False)}
    results["frame_words"] = FRAME_WORDS

    # 2./3. bandwidth per prompt length
    inbox = Inbox() if not sending else None
    receiver = KVReceiver(pair, inbox, shape) if not sending else None
    header_sender = Sender(header) if sending else None
    # One sender per mode for the whole run, as a prefill rank keeps one per pair.
    kv_senders = {mode: KVSender(pair, header_sender, shape, mode) for mode in TransferMode
                  } if sending else {}
    rows = []
    for tokens in args.tokens:
        kv_bytes = tokens * shape.bytes_per_token
        hidden_bytes = shape.hidden_size * shape.dtype.itemsize
        total = kv_bytes + hidden_bytes
        flat = torch.ones(total // 2, dtype=torch.bfloat16, device=data.device)

        def raw() -> None:
            if sending:
                dist.send(flat, 2, group=data.group)
            else:
                dist.recv(flat, 1, group=data.group)
            wait_ack()

        k = torch.ones(tokens, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype,
                       device=data.device)
        hidden = torch.ones(1, shape.hidden_size, dtype=shape.dtype, device=data.device)

        # Stand-in for one layer's prefill compute: an MLP-sized bf16 matmul, [T, 576] x [576,
        # 4608] (SmolLM2's gate+up+down weights are 3 x 576 x 1536).
        x = torch.ones(tokens, shape.hidden_size, dtype=shape.dtype)
        w = torch.ones(shape.hidden_size, 8 * shape.hidden_size, dtype=shape.dtype)

        def transfer(mode: TransferMode, compute: bool = False) -> float:
            """Returns the exposed time: from the end of compute to the receiver's ack."""
            t_computed = time.perf_counter()
            if sending:
                s = kv_senders[mode]
                s.start([KVEntry(7, tokens)])
                for layer in range(shape.num_layers):
                    s.layer(layer, k, k)
                    if compute:
                        torch.mm(x, w)
                s.hidden(hidden)
                t_computed = time.perf_counter()
                s.finish()
            else:
                while True:
                    _, item = inbox.get(timeout=60)
                    if isinstance(item, StagingDone):
                        item.release()
                        break
            wait_ack()
            return time.perf_counter() - t_computed

        # Interleave the cases so load from other processes hits them alike.
        cases = {"raw": raw, "layerwise": lambda: transfer(TransferMode.LAYERWISE),
                 "whole": lambda: transfer(TransferMode.WHOLE)}
        overlap = {"layerwise": lambda: transfer(TransferMode.LAYERWISE, compute=True),
                   "whole": lambda: transfer(TransferMode.WHOLE, compute=True)}
        times: dict[str, list[float]] = {name: [] for name in cases}
        exposed: dict[str, list[float]] = {name: [] for name in overlap}
        compute_s: list[float] = []
        for it in range(args.iters + 1):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                if it:  # the first round is warm-up
                    times[name].append(time.perf_counter() - t0)
            for name, fn in overlap.items():
                t0 = time.perf_counter()
                after = fn()
                if it:
                    exposed[name].append(after)
                    compute_s.append(time.perf_counter() - t0 - after)
        row = {"tokens": tokens, "bytes": total}
        for name, ts in times.items():
            row[f"{name}_s_median"] = statistics.median(ts)
            row[f"{name}_s_min"] = min(ts)
            row[f"{name}_GBps"] = total / statistics.median(ts) / 1e9
        for name in ("layerwise", "whole"):
            row[f"{name}_vs_raw"] = row["raw_s_median"] / row[f"{name}_s_median"]
            row[f"{name}_vs_raw_min"] = row["raw_s_min"] / row[f"{name}_s_min"]
            row[f"{name}_exposed_s_median"] = statistics.median(exposed[name])
        row["overlap_compute_s_median"] = statistics.median(compute_s)
        rows.append(row)
    results["transfers"] = rows
    if sending:
        header_sender.close()
    else:
        receiver.thread.join()
    dist.barrier()
    if rank == 1:
        report(args, results, str(data.device), data.backend)


def report(args: argparse.Namespace, results: dict, device: str, backend: str) -> None:
    print("\ncontrol link (gloo), one-way p2p latency:")
    for words, us in results["p2p_one_way_us"].items():
        print(f"  {int(words) * 8:>7} B   {us:7.1f} us")
    print(f"channel message round trip (frame = {results['frame_words']} words):")
    for name, us in results["channel_round_trip_us"].items():
        print(f"  {name:<30} {us:7.1f} us")
    print(f"\nKV transfer, SmolLM2-135M bf16 shapes, data link {backend} on {device}:")
    print("GB/s from median times; 'x raw' = raw time / mode time, median (and best-of) runs")
    print(f"{'tokens':>7} {'MB':>7} {'raw GB/s':>9} {'layerwise':>10} {'x raw':>12} "
          f"{'whole':>7} {'x raw':>12}")
    for r in results["transfers"]:
        print(f"{r['tokens']:>7} {r['bytes'] / 1e6:>7.2f} {r['raw_GBps']:>9.2f} "
              f"{r['layerwise_GBps']:>10.2f} {r['layerwise_vs_raw']:>5.2f} "
              f"({r['layerwise_vs_raw_min']:.2f}) {r['whole_GBps']:>7.2f} "
              f"{r['whole_vs_raw']:>5.2f} ({r['whole_vs_raw_min']:.2f})")
    print("\nwith a stand-in compute per layer: transfer time left after compute ends (median)")
    print(f"{'tokens':>7} {'compute ms':>11} {'layerwise ms':>13} {'whole ms':>9}")
    for r in results["transfers"]:
        print(f"{r['tokens']:>7} {r['overlap_compute_s_median'] * 1e3:>11.1f} "
              f"{r['layerwise_exposed_s_median'] * 1e3:>13.2f} "
              f"{r['whole_exposed_s_median'] * 1e3:>9.2f}")
    import torch

    results["meta"] = {"device": device, "backend": backend, "iters": args.iters,
                       "torch": torch.__version__, "host_cpus": os.cpu_count(),
                       "machine": platform.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def main() -> int:
    args = parse_args(sys.argv[1:])
    if "RANK" not in os.environ:
        return relaunch(sys.argv[1:])
    run_rank(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
