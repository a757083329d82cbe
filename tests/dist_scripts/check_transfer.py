"""KV transfer end to end on 1P2D (rank 1 prefill; ranks 2, 3 decode), tiny shapes.

The prefill rank sends several batches, some split over both decode ranks, some back to back
on one pair; each decode rank checks every (request, layer) K and V and every hidden state
bit-exact against the same deterministic data, and the order of the items: a request's layers
in order, then its hidden state last.

One world runs every (mode, dtype) combination in turn: each round opens fresh header senders
and receivers and ends with a Shutdown on every header link (the receiver threads must exit).

Run with `--prefill 1 --decode 2`.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from common import say, start
from pd_local.cluster.dist import Role
from pd_local.launch import run_guarded
from pd_local.cluster.channel import Inbox, Sender
from pd_local.cluster.messages import KVEntry, TransferMode
from pd_local.cluster.transfer import KVReceiver, KVSender, KVShape, LayerKV, PromptHidden, StagingDone

# (req_id, num_tokens, decode rank) per batch; batch order = send order.
BATCHES = [
    [(10, 5, 2), (11, 3, 2), (12, 7, 3)],
    [(13, 1, 3)],
    [(14, 17, 2), (15, 2, 3), (16, 4, 2)],
    [(17, 9, 2)],
]


def kv_of(req_id: int, n: int, s: KVShape) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, 2, n, kv_heads, head_dim] K/V and [hidden] of a request: random bits, fixed seed.

    bf16/f32 from random int bits (NaN and -0.0 patterns included) so bit-exactness is tested,
    not just closeness.
    """
    g = torch.Generator().manual_seed(req_id)
    bits = 16 if s.dtype == torch.bfloat16 else 32
    int_dtype = torch.int16 if bits == 16 else torch.int32
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    kv = torch.randint(lo, hi, (s.num_layers, 2, n, s.num_kv_heads, s.head_dim), generator=g,
                       dtype=torch.int64).to(int_dtype).view(s.dtype)
    hidden = torch.randint(lo, hi, (s.hidden_size,), generator=g,
                           dtype=torch.int64).to(int_dtype).view(s.dtype)
    return kv, hidden


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    itype = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(itype), b.view(itype))


COMBOS = [(mode, dtype) for mode in TransferMode for dtype in (torch.bfloat16, torch.float32)]


def refuses(fn, match: str) -> None:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        assert match in str(e), f"{e!r} lacks {match!r}"
    else:
        raise AssertionError(f"no error (wanted {match!r})")


def misuse(sender: KVSender, shape: KVShape) -> None:
    """Misuse is refused before anything reaches the wire (so the peer never sees it)."""
    kv = torch.zeros(4, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype)
    refuses(lambda: sender.layer(0, kv, kv), "layer() before start()")
    refuses(lambda: sender.finish(), "finish() before hidden()")
    sender._entries = (KVEntry(1, 4),)  # as if started, without sending a header
    refuses(lambda: sender.layer(1, kv, kv), "layer 1 sent, expected 0")
    refuses(lambda: sender.layer(0, kv[:3], kv[:3]), "expected [4, 2, 4]")
    refuses(lambda: sender.layer(0, kv.float() if shape.dtype == torch.bfloat16 else kv.half(),
                                 kv), "expected [4, 2, 4]")
    refuses(lambda: sender.hidden(torch.zeros(1, shape.hidden_size, dtype=shape.dtype)),
            "hidden() after 0 of 3 layers")
    sender._entries = None


def prefill(ctx, shape: KVShape, mode: TransferMode) -> None:
    senders = {d: KVSender(pair, Sender(pair.header), shape, mode)
               for (p, d), pair in ctx.links.kv.items()}
    misuse(senders[2], shape)
    for batch in BATCHES:
        # The prefill loop orders a batch by destination so each one's tokens are contiguous.
        batch = sorted(batch, key=lambda e: e[2])
        data = {req: kv_of(req, n, shape) for req, n, _ in batch}
        dests = sorted({d for _, _, d in batch})
        for d in dests:
            senders[d].start([KVEntry(req, n) for req, n, dd in batch if dd == d])
        # Flattened batch KV per layer, as the model's on_layer_kv would give it: [T, H, D].
        for layer in range(shape.num_layers):
            k_all = torch.cat([data[req][0][layer, 0] for req, _, _ in batch])
            v_all = torch.cat([data[req][0][layer, 1] for req, _, _ in batch])
            start_tok = 0
            for d in dests:
                n_d = sum(n for _, n, dd in batch if dd == d)
                senders[d].layer(layer, k_all[start_tok:start_tok + n_d],
                                 v_all[start_tok:start_tok + n_d])
                start_tok += n_d
            time.sleep(0.002)  # the next layer's "compute", overlapped with the sends
        for d in dests:
            senders[d].hidden(torch.stack([data[req][1] for req, _, dd in batch if dd == d]))
        for d in dests:
            stat = senders[d].finish()
            assert stat.num_bytes > 0 and stat.seconds > 0, stat
    for s in senders.values():
        s.header.close()
    say(ctx, f"{mode.name} {shape.dtype}: sent {sum(len(b) for b in BATCHES)} requests")


def decode(ctx, shape: KVShape) -> None:
    inbox = Inbox()
    receivers = [KVReceiver(pair, inbox, shape) for pair in ctx.links.kv.values()]
    mine = {req: n for batch in BATCHES for req, n, d in batch if d == ctx.rank}
    next_layer = {req: 0 for req in mine}
    done: set[int] = set()
    transfers = sum(1 for batch in BATCHES if any(d == ctx.rank for _, _, d in batch))
    released = 0
    while len(done) < len(mine) or released < transfers:
        item = inbox.get(timeout=30)
        assert item is not None, f"rank {ctx.rank}: waiting for {set(mine) - done}"
        _, x = item
        if isinstance(x, StagingDone):
            # Every request of the transfer came before it; its memory may now be reused.
            released += 1
            x.release()
            continue
        kv, hidden = kv_of(x.req_id, mine[x.req_id], shape)
        if isinstance(x, LayerKV):
            assert x.layer == next_layer[x.req_id], (x.req_id, x.layer, next_layer[x.req_id])
            assert same_bits(x.k, kv[x.layer, 0]) and same_bits(x.v, kv[x.layer, 1]), (
                f"req {x.req_id} layer {x.layer}: KV differs")
            next_layer[x.req_id] += 1
        else:
            assert isinstance(x, PromptHidden), x
            assert next_layer[x.req_id] == shape.num_layers, "hidden before all layers"
            assert same_bits(x.hidden, hidden), f"req {x.req_id}: hidden differs"
            assert x.record.num_bytes == mine[x.req_id] * shape.bytes_per_token + \
                shape.hidden_size * shape.dtype.itemsize, x.record
            done.add(x.req_id)
    for r in receivers:
        r.thread.join(timeout=30)
        assert not r.thread.is_alive(), "receiver did not exit on Shutdown"
    assert inbox.poll() is None, "items beyond the expected ones"
    nbytes = sum(s.num_bytes for r in receivers for s in r.stats)
    say(ctx, f"{shape.dtype}: received {len(done)} requests bit-exact, {nbytes} bytes")


def main() -> None:
    ctx, _ = start(sys.argv[1:])
    for mode, dtype in COMBOS:
        shape = KVShape(num_layers=3, num_kv_heads=2, head_dim=4, hidden_size=8, dtype=dtype)
        if ctx.role is Role.PREFILL:
            prefill(ctx, shape, mode)
        elif ctx.role is Role.DECODE:
            decode(ctx, shape)
        dist.barrier()
    ctx.close()


if __name__ == "__main__":
    run_guarded(main)
