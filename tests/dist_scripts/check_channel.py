"""The control channel over a colocated-1 world (rank 0 <-> rank 1):

1. many messages each way at once (to_worker: 0->1, from_worker: 1->0), mixed kinds and sizes
   (prompts longer than a frame included), received complete and in order;
2. heartbeats keep both links alive through an idle spell of 2.5 group timeouts;
3. without heartbeats an idle link fails after the group timeout, and the loop sees LinkDown
   instead of hanging.

Run with `--colocated 1 --set timeouts.group_s=2`.
"""

from __future__ import annotations

import os
import sys
import time

from common import say, start
from pd_local.launch import run_guarded
from pd_local.engine.events import Load
from pd_local.engine.sampling import SamplingParams
from pd_local.cluster.channel import FRAME_WORDS, Heartbeater, Inbox, LinkDown, Receiver, Sender
from pd_local.cluster.messages import (Abort, FinishReason, Prefill, Reserve, TokenEntry,
                                       Tokens)

N = 600


def outgoing(i: int, rank: int):
    if rank == 0:
        if i % 3 == 0:
            # Up to ~3 frames long: exercises the remainder send.
            prompt = tuple(range(i, i + (i * 7) % (3 * FRAME_WORDS)))
            return Reserve(i, prompt, SamplingParams(temperature=0.1 * (i % 9), top_p=1 / (i + 1),
                                                     top_k=i % 50, seed=i if i % 2 else None,
                                                     max_tokens=i + 1, ignore_eos=bool(i % 2),
                                                     stop_token_ids=(2, i)))
        if i % 3 == 1:
            return Prefill(i, (i,), 1)
        return Abort(i)
    entries = tuple(TokenEntry(i * 100 + j, j, j == 3, FinishReason.STOP if j == 3
                               else None) for j in range(i % 70))
    return Tokens(entries, Load(free_blocks=i, total_blocks=1000, running=len(entries)), t=1.8e9 + i / 7)


def main() -> None:
    ctx, _ = start(sys.argv[1:])
    links = ctx.links
    out_link = links.to_worker[1] if ctx.rank == 0 else links.from_worker[1]
    in_link = links.from_worker[1] if ctx.rank == 0 else links.to_worker[1]
    sender, inbox = Sender(out_link), Inbox()
    _receiver = Receiver(in_link, inbox)  # its thread feeds inbox
    peer = 1 - ctx.rank

    # 1. both directions at once, order and content preserved
    sent = [outgoing(i, ctx.rank) for i in range(N)]
    expected = [outgoing(i, peer) for i in range(N)]
    t0 = time.perf_counter()
    for msg in sent:
        sender.send(msg)
    for i, want in enumerate(expected):
        item = inbox.get(timeout=30)
        assert item is not None, f"message {i} never came"
        src, got = item
        assert src == peer and got == want, f"message {i}: got {got!r}, want {want!r}"
    say(ctx, f"ordered ok {N} messages each way in {time.perf_counter() - t0:.2f} s")

    # 2. idle through 2.5 group timeouts with heartbeats running; the links still work
    group_s = ctx.cfg.timeouts.group_s
    beat = Heartbeater([sender], ctx.cfg.timeouts.heartbeat_s, inbox)
    time.sleep(2.5 * group_s)
    sender.send(Abort(12345))
    item = inbox.get(timeout=30)
    # The peer's Abort is the only thing to arrive: heartbeats are dropped by the receiver.
    assert item == (peer, Abort(12345)), item
    t_last = time.monotonic()  # the receiver thread is now blocked on its next receive
    time.sleep(ctx.cfg.timeouts.heartbeat_s)
    assert inbox.poll() is None, "heartbeats leaked into the inbox"
    say(ctx, "heartbeats ok")

    # 3. heartbeats off: the idle receive fails after the group timeout, loudly
    beat.stop()
    try:
        inbox.get(timeout=4 * group_s)
    except LinkDown as e:
        waited = time.monotonic() - t_last
        say(ctx, f"link down after {waited:.1f} s: {str(e)[:80]}")
    else:
        raise AssertionError("an idle link without heartbeats did not fail")
    # Both links are now broken for good; leave without destroying the groups.
    os._exit(0)


if __name__ == "__main__":
    run_guarded(main)
