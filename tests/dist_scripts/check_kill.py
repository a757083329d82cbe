"""A rank killed (SIGKILL) or frozen (SIGSTOP: a hung rank) in the middle of a KV transfer:
every other rank must notice through its links and exit non-zero, never hang. A dead peer's
sockets close at once; a frozen one stops sending heartbeats, so its links time out after
timeouts.group_s. 1P1D: rank 0 router, 1 prefill (the victim), 2 decode.

Every rank runs what a real rank runs around its loop: receiver threads on its incoming links,
a heartbeater on its outgoing ones, and a loop blocked on its inbox. Prints 'SIGKILL' or
'SIGSTOP' just before the victim dies or freezes.

Run with `--prefill 1 --decode 1 --set timeouts.group_s=10 [--signal KILL|STOP]`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from common import say, start
from pd_local.cluster.dist import Role
from pd_local.launch import run_guarded
from pd_local.cluster.channel import Heartbeater, Inbox, Receiver, Sender
from pd_local.cluster.messages import KVEntry, TransferMode
from pd_local.cluster.transfer import KVReceiver, KVSender, KVShape

SHAPE = KVShape(num_layers=8, num_kv_heads=3, head_dim=64, hidden_size=576, dtype=torch.bfloat16)


def main() -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--signal", choices=("KILL", "STOP"), default="KILL")
    ctx, args = start(sys.argv[1:], extra)
    links, inbox = ctx.links, Inbox()
    incoming = [*links.to_worker.values(), *links.from_worker.values()]
    senders = [Sender(link) for link in incoming if link.is_sender]
    receivers = [Receiver(link, inbox) for link in incoming if not link.is_sender]
    kv_senders = [KVSender(pair, Sender(pair.header), SHAPE, TransferMode.LAYERWISE)
                  for pair in links.kv.values() if pair.header.is_sender]
    kv_receivers = [KVReceiver(pair, inbox, SHAPE) for pair in links.kv.values()
                    if not pair.header.is_sender]
    Heartbeater(senders + [s.header for s in kv_senders], ctx.cfg.timeouts.heartbeat_s, inbox)
    say(ctx, f"up: {len(receivers)} receivers, {len(kv_receivers)} kv receivers")

    if ctx.role is Role.PREFILL:
        (sender,) = kv_senders
        n = 4096
        sender.start([KVEntry(1, n)])
        kv = torch.ones(n, SHAPE.num_kv_heads, SHAPE.head_dim, dtype=SHAPE.dtype)
        for layer in range(3):
            sender.layer(layer, kv, kv)
        print(f"SIG{args.signal}", flush=True)
        os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}"))

    while True:  # the rank loop: only a link failure gets it out
        inbox.get(timeout=None)


if __name__ == "__main__":
    run_guarded(main)
