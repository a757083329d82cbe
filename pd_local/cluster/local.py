"""The world of `--colocated 1` in one process, without torchrun: the router and one worker loop
on threads, joined by in-memory links that carry the same encoded messages as gloo would. What
the tests' in-process server runs; its `router` is the `Backend`."""

from __future__ import annotations

import queue
import threading

import torch

from pd_local.cluster import worker
from pd_local.cluster.channel import LinkDown
from pd_local.cluster.dist import DistContext, Link, Links, Role, Topology
from pd_local.cluster.router import Router
from pd_local.config import ConfigError, ServeConfig


class LocalWorld:
    """Start it, then wait for `router.ready`; `shutdown()` stops the worker and the router."""

    def __init__(self, cfg: ServeConfig) -> None:
        if cfg.topology.colocated != 1 or cfg.device != "cpu":
            raise ConfigError(f"one process runs colocated-1 on cpu, not {cfg.topology.label} on {cfg.device}")
        topo = Topology.from_config(cfg.topology)
        down: queue.Queue[list[int]] = queue.Queue()  # router -> worker
        up: queue.Queue[list[int]] = queue.Queue()  # worker -> router
        cpu = torch.device("cpu")

        def ctx(rank: int, role: Role) -> DistContext:
            links = Links({1: Link("0->1", None, 0, 1, rank, cpu, "local", down)},
                          {1: Link("1->0", None, 1, 0, rank, cpu, "local", up)}, {})
            return DistContext(cfg, rank, topo, role, cpu, links)

        self.error: BaseException | None = None
        self.router = Router(ctx(0, Role.FRONTEND))
        self.thread = threading.Thread(target=self._work, args=(ctx(1, Role.COLOCATED),),
                                       name="worker 1", daemon=True)
        self.thread.start()

    def _work(self, ctx: DistContext) -> None:
        try:
            worker.run(ctx)
        except BaseException as e:  # noqa: BLE001 - as a dead rank's link would, it fails the router
            self.error = e
            self.router.inbox.fail(1, LinkDown(f"worker 1 failed: {type(e).__name__}: {e}"))

    def shutdown(self) -> None:
        self.router.shutdown()
        self.thread.join(timeout=3 * self.router.ctx.cfg.timeouts.group_s)
