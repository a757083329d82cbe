"""The shared-memory KV transfer (cluster/ipc_transfer.py) end to end on 1P2D, tiny shapes.

check_transfer.py's batches and data, through IpcKVSender / IpcKVReceiver on CPU (the slot is
a /dev/shm file both ranks map; on CUDA it is a CUDA IPC allocation, same protocol): every
(request, layer) K and V and every hidden state bit-exact and in order, the slot grown and
announced again when a batch needs more, nothing left in /dev/shm afterwards.

Run with `--prefill 1 --decode 2`.
"""

from __future__ import annotations

import glob
import sys

import torch
import torch.distributed as dist
from check_transfer import BATCHES, kv_of, same_bits
from common import say, start

from pd_local.cluster.channel import Inbox, Sender
from pd_local.cluster.dist import Role
from pd_local.cluster.ipc_transfer import IpcKVReceiver, IpcKVSender
from pd_local.cluster.messages import KVEntry, TransferMode
from pd_local.cluster.transfer import KVShape, LayerKV, PromptHidden, StagingDone
from pd_local.launch import run_guarded

CPU = torch.device("cpu")


def prefill(ctx, shape: KVShape) -> None:
    senders = {d: IpcKVSender(pair, Sender(pair.header), shape, TransferMode.WHOLE, CPU)
               for (p, d), pair in ctx.links.kv.items()}
    s = senders[2]
    kv = torch.zeros(4, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype)
    for fn, match in ((lambda: s.layer(0, kv, kv), "layer() before start()"),
                      (lambda: s.finish(), "finish() before hidden()")):
        try:
            fn()
        except RuntimeError as e:
            assert match in str(e), e
        else:
            raise AssertionError(f"no error, wanted {match!r}")
    grown = 0
    for batch in BATCHES:
        batch = sorted(batch, key=lambda e: e[2])
        data = {req: kv_of(req, n, shape) for req, n, _ in batch}
        dests = sorted({d for _, _, d in batch})
        for d in dests:
            before = senders[d]._slot
            senders[d].start([KVEntry(req, n) for req, n, dd in batch if dd == d])
            grown += senders[d]._slot is not before
        for layer in range(shape.num_layers):
            for d in dests:
                reqs = [req for req, _, dd in batch if dd == d]
                senders[d].layer(layer, torch.cat([data[r][0][layer, 0] for r in reqs]),
                                 torch.cat([data[r][0][layer, 1] for r in reqs]))
        for d in dests:
            senders[d].hidden(torch.stack([data[req][1] for req, _, dd in batch if dd == d]))
        for d in dests:
            stat = senders[d].finish()
            assert stat.num_bytes > 0, stat
    for s in senders.values():
        s.header.close()
        s.close()
    say(ctx, f"{shape.dtype}: sent {sum(len(b) for b in BATCHES)} requests, {grown} slots "
             f"announced")


def decode(ctx, shape: KVShape) -> None:
    inbox = Inbox()
    receivers = [IpcKVReceiver(pair, inbox, shape, CPU) for pair in ctx.links.kv.values()]
    mine = {req: n for batch in BATCHES for req, n, d in batch if d == ctx.rank}
    next_layer = {req: 0 for req in mine}
    done: set[int] = set()
    transfers = sum(1 for batch in BATCHES if any(d == ctx.rank for _, _, d in batch))
    released = 0
    while len(done) < len(mine) or released < transfers:
        item = inbox.get(timeout=30)
        assert item is not None, f"rank {ctx.rank}: waiting for {set(mine) - done}"
        x = item[1]
        if isinstance(x, StagingDone):
            released += 1
            x.release()
            continue
        kv, hidden = kv_of(x.req_id, mine[x.req_id], shape)
        if isinstance(x, LayerKV):
            assert x.layer == next_layer[x.req_id], (x.req_id, x.layer)
            assert same_bits(x.k, kv[x.layer, 0]) and same_bits(x.v, kv[x.layer, 1]), x.req_id
            next_layer[x.req_id] += 1
        else:
            assert isinstance(x, PromptHidden), x
            assert next_layer[x.req_id] == shape.num_layers, "hidden before all layers"
            assert same_bits(x.hidden, hidden), f"req {x.req_id}: hidden differs"
            done.add(x.req_id)
    for r in receivers:
        r.thread.join(timeout=30)
        assert not r.thread.is_alive(), "receiver did not exit on Shutdown"
    assert inbox.poll() is None, "items beyond the expected ones"
    say(ctx, f"{shape.dtype}: received {len(done)} requests bit-exact")


def main() -> None:
    ctx, _ = start(sys.argv[1:])
    before = set(glob.glob("/dev/shm/pd_local_kv_*"))
    for dtype in (torch.bfloat16, torch.float32):
        shape = KVShape(num_layers=3, num_kv_heads=2, head_dim=4, hidden_size=8, dtype=dtype)
        if ctx.role is Role.PREFILL:
            prefill(ctx, shape)
        elif ctx.role is Role.DECODE:
            decode(ctx, shape)
        dist.barrier()
    if ctx.role is Role.PREFILL:
        left = set(glob.glob("/dev/shm/pd_local_kv_*")) - before
        assert not left, f"slot files left behind: {left}"
        say(ctx, "no slot files left")
    ctx.close()


if __name__ == "__main__":
    run_guarded(main)
