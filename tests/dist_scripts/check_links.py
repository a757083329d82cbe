"""Every link of a topology works in the direction it should, and each rank holds exactly the
links it is an end of. Prints 'RESULT rank R: links ok N' per rank."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from common import say, start
from pd_local.cluster.dist import Role
from pd_local.cluster.channel import Inbox, Receiver, Sender
from pd_local.cluster.messages import Abort, Shutdown


def expected_keys(ctx) -> dict[str, set]:
    topo, r = ctx.topology, ctx.rank
    if ctx.role is Role.FRONTEND:
        workers = set(topo.worker_ranks)
        return {"to_worker": workers, "from_worker": workers, "kv": set()}
    kv = {pair for pair in topo.kv_pairs if r in pair}
    if ctx.role is Role.ELASTIC:
        others = set(topo.worker_ranks) - {r}
        assert kv == {(r, o) for o in others} | {(o, r) for o in others}, kv
    return {"to_worker": {r}, "from_worker": {r}, "kv": kv}


def main() -> None:
    ctx, _ = start(sys.argv[1:])
    links = ctx.links
    for name, keys in expected_keys(ctx).items():
        got = set(getattr(links, name))
        assert got == keys, f"rank {ctx.rank} {name}: has {sorted(got)}, expected {sorted(keys)}"

    control = [*links.to_worker.values(), *links.from_worker.values(),
               *(pair.header for pair in links.kv.values())]
    for link in control:
        assert link.backend == "gloo" and link.device.type == "cpu", link
        assert ctx.rank in (link.src, link.dst)
    inbox = Inbox()
    receivers = [Receiver(link, inbox) for link in control if not link.is_sender]
    for link in control:
        if link.is_sender:
            s = Sender(link)
            s.send(Abort(link.src * 100 + link.dst))
            s.close()
    got: dict[int, list] = {}
    for _ in range(2 * len(receivers)):
        item = inbox.get(timeout=30)
        assert item is not None, f"rank {ctx.rank}: a control message never came"
        got.setdefault(item[0], []).append(item[1])
    for r in receivers:
        r.thread.join(timeout=5)
        assert not r.thread.is_alive(), f"receiver on {r.link.name} did not exit after Shutdown"
    # Each peer may reach this rank on two links (kv header + another); collect per link.
    want: dict[int, list] = {}
    for link in control:
        if not link.is_sender:
            want.setdefault(link.src, []).extend([Abort(link.src * 100 + link.dst), Shutdown()])
    for peer in want:
        assert sorted(map(repr, got.get(peer, []))) == sorted(map(repr, want[peer])), (
            f"rank {ctx.rank} from {peer}: {got.get(peer)} != {want[peer]}")

    for (p, d), pair in sorted(links.kv.items()):
        data = pair.data
        assert data.device == torch.device("cpu") and data.backend == "gloo", data
        payload = torch.arange(6, dtype=torch.bfloat16) + p * 10 + d
        if data.is_sender:
            dist.send(payload, d, group=data.group)
        else:
            buf = torch.empty_like(payload)
            dist.recv(buf, p, group=data.group)
            assert torch.equal(buf, payload), (p, d, buf)
    dist.barrier()
    say(ctx, f"links ok {len(links.all())} role={ctx.role.value}")
    ctx.close()


if __name__ == "__main__":
    main()
