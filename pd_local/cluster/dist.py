"""Ranks -> roles, devices and process groups; the only caller of init_process_group. Rank 0 is
the router; then prefill ranks and decode ranks, or colocated replicas. Every link is a 2-rank
group created in one fixed order on every rank (docs/architecture.md, Links); a pair sharing a
GPU gets a gloo data group, as NCCL refuses it."""

from __future__ import annotations

import datetime
import enum
import functools
import logging
import os
import queue
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd_local.cluster.kv_slices import HeadSlice, plan
from pd_local.cluster.lockstep import Lockstep
from pd_local.cluster.shutdown import WorkerSignals
from pd_local.config import ConfigError, ServeConfig, TopologyConfig, check_world
from pd_local.engine import threads as cpu_threads
from pd_local.model.config import ModelConfig

log = logging.getLogger(__name__)


class Role(enum.Enum):
    FRONTEND = "frontend"
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"
    ELASTIC = "elastic"


@dataclass(frozen=True)
class Topology:
    """Instance leaders (the router's targets): `prefill_ranks` prefill for others, `decode_ranks`
    decode (colocated: there; elastic: both). `instances`: every instance's ranks, leader first."""

    prefill_ranks: tuple[int, ...]
    decode_ranks: tuple[int, ...]
    colocated: bool
    elastic: bool = False
    instances: tuple[tuple[int, ...], ...] = ()
    kv_heads: int = 0  # the model's: TP pairs move head slices of them (kv_slices.plan)

    def __post_init__(self) -> None:
        if not self.instances:  # one rank each
            object.__setattr__(self, "instances", tuple((r,) for r in self.worker_ranks))

    @classmethod
    def from_config(cls, topo: TopologyConfig, kv_heads: int = 0) -> Topology:
        sizes = [topo.tp_sizes[0]] * topo.prefill + [topo.tp_sizes[-1]] * topo.decode or [topo.tp] * topo.instances
        starts = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        instances = tuple(tuple(range(a, a + k)) for a, k in zip(starts, sizes))
        if topo.is_colocated:
            return cls((), tuple(starts), True, False, instances)
        if topo.elastic:
            return cls(tuple(starts), tuple(starts), False, True, instances)
        return cls(tuple(starts[:topo.prefill]), tuple(starts[topo.prefill:]), False, False, instances, kv_heads)

    @property
    def world_size(self) -> int:
        return 1 + sum(map(len, self.instances))

    @property
    def worker_ranks(self) -> tuple[int, ...]:
        """The instance leaders."""
        return tuple(sorted({*self.prefill_ranks, *self.decode_ranks}))

    def instance(self, rank: int) -> tuple[int, ...]:
        for ranks in self.instances:
            if rank in ranks:
                return ranks
        raise ValueError(f"rank {rank} is outside topology of {self.world_size} ranks")

    @property
    def kv_pairs(self) -> tuple[tuple[int, int], ...]:
        """Every (prefill rank, decode rank) pair of two ranks, in the one order all ranks use."""
        if self.slices:
            return tuple(self.slices)
        return tuple((p, d) for p in self.prefill_ranks for d in self.decode_ranks if p != d)

    @functools.cached_property
    def slices(self) -> dict[tuple[int, int], HeadSlice]:
        """Prefill and decode instances with TP: each pair of their ranks that shares KV heads."""
        out: dict[tuple[int, int], HeadSlice] = {}
        if self.elastic or self.colocated or all(len(i) == 1 for i in self.instances):
            return out
        for p in self.prefill_ranks:
            for d in self.decode_ranks:
                ps, ds = self.instance(p), self.instance(d)
                out.update(((ps[s.prefill], ds[s.decode]), s) for s in plan(self.kv_heads, len(ps), len(ds)))
        return out

    def senders(self, rank: int) -> int:
        """The prefill ranks whose KV a decode rank's prompt needs (TP: those sharing its heads)."""
        first = self.instance(self.prefill_ranks[0]) if self.prefill_ranks else ()
        return sum(1 for p, d in self.slices if d == rank and p in first) or 1

    def role(self, rank: int) -> Role:
        if rank == 0:
            return Role.FRONTEND
        leader = self.instance(rank)[0]
        if leader in self.prefill_ranks:
            return Role.ELASTIC if self.elastic else Role.PREFILL
        return Role.COLOCATED if self.colocated else Role.DECODE


def device_for_rank(rank: int, device: str, cuda_device_count: int, per_node: int = 0) -> torch.device:
    """Rank 0 is always CPU; worker slot i of its host gets cuda:(i % count) on CUDA (wrapping
    round only with share_device: check_world refuses it otherwise)."""
    if rank == 0 or device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", worker_slot(rank, per_node) % cuda_device_count)


def worker_slot(rank: int, per_node: int = 0) -> int:
    """A worker's index among its host's workers (rank 0, the front-end, is on the first host)."""
    return rank - 1 if not per_node or rank < per_node else rank % per_node


@dataclass(frozen=True)
class Link:
    """One direction of a 2-rank group, seen from `rank` (one of its two ends)."""

    name: str  # "0->1", for logs and error messages
    group: dist.ProcessGroup | None
    src: int
    dst: int
    rank: int
    device: torch.device  # where tensors sent or received on this link must live
    backend: str  # "gloo", "nccl", or "local": one process, the messages' words go by `pipe`
    pipe: queue.Queue[list[int]] | None = None

    @property
    def peer(self) -> int:
        return self.dst if self.rank == self.src else self.src

    @property
    def is_sender(self) -> bool:
        return self.rank == self.src


@dataclass(frozen=True)
class KVLink:
    """A (prefill, decode) pair: headers on a CPU gloo group (sizes known without a device sync,
    heartbeats on it), tensors on a device group that only waits on announced transfers."""

    header: Link
    data: Link

    @property
    def prefill(self) -> int:
        return self.header.src

    @property
    def decode(self) -> int:
        return self.header.dst


@dataclass(frozen=True)
class Links:
    """Control links router <-> each worker, keyed by the worker's rank (a TP follower's only
    goes to the router), and the KV pairs."""

    to_worker: Mapping[int, Link]
    from_worker: Mapping[int, Link]
    kv: Mapping[tuple[int, int], KVLink]

    def all(self) -> list[Link]:
        out = [*self.to_worker.values(), *self.from_worker.values()]
        for pair in self.kv.values():
            out += [pair.header, pair.data]
        return out


@dataclass
class DistContext:
    """What a rank knows about the world after `init_distributed`."""

    cfg: ServeConfig
    rank: int
    topology: Topology
    role: Role
    device: torch.device
    links: Links
    lockstep: Lockstep | None = None  # a rank of a TP instance: the instance's turns
    tp_group: dist.ProcessGroup | None = None  # ... and its all-reduces' group
    signals: WorkerSignals | None = None  # a worker's stop-signal policy (launch.py)

    @property
    def instance(self) -> tuple[int, ...]:
        return self.topology.instance(self.rank)

    def close(self) -> None:
        """Barrier, then destroy all groups. Only after the Shutdown exchange, no receive
        pending (else it can block: error paths exit instead, launch.py)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _store(rank: int, world_size: int, timeout: datetime.timedelta,
           env: Mapping[str, str]) -> dist.Store:
    """A TCPStore client under a per-attempt prefix: torchrun's store outlives a failed
    attempt, whose keys would break the next rendezvous (docs/design.md)."""
    try:
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    except KeyError as e:
        raise RuntimeError(f"{e.args[0]} is not set: start ranks with torchrun") from None
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(addr, port, world_size, is_master=not agent_store and rank == 0,
                         timeout=timeout)
    return dist.PrefixStore(f"attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def init_distributed(cfg: ServeConfig, env: Mapping[str, str] | None = None) -> DistContext:
    """Join the world torchrun started, create every group and warm the data links.

    Refuses (ConfigError, before touching the network) a world that does not fit `cfg`.
    Every rank must call this with the same `cfg`.
    """
    env = os.environ if env is None else env
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    cuda_count = torch.cuda.device_count() if cfg.device == "cuda" else 0
    check_world(cfg, world_size, cuda_count, int(env.get("LOCAL_WORLD_SIZE", world_size)))
    topo = Topology.from_config(cfg.topology, ModelConfig.from_dir(cfg.model).num_kv_heads)
    role = topo.role(rank)
    per_node = int(env.get("LOCAL_WORLD_SIZE", world_size))
    device = device_for_rank(rank, cfg.device, cuda_count, per_node)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds each rank's communicators to this device
    # Before any group exists, so every thread started from here on inherits the binding.
    cores = cpu_threads.usable_cores()
    here = per_node - (rank < per_node)  # the workers on this host
    plan = cpu_threads.plan_world(cores, max(here, 1), cfg.engine.threads,
                                  cfg.device)[0 if rank == 0 else 1 + worker_slot(rank, per_node)]
    threads, cpus = cpu_threads.apply(plan)
    log.info("rank %d (%s): %d threads on CPUs %s (%s)", rank, role.value, threads, cpus, plan.why)

    timeout = datetime.timedelta(seconds=cfg.timeouts.group_s)
    store = _store(rank, world_size, timeout, env)
    # The default group is gloo on every rank: rank 0 has no GPU, and it only serves the
    # start-up barrier.
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    _check_alike(cfg, per_node)
    links = _create_links(cfg, topo, rank, cuda_count, timeout, per_node)
    ctx = DistContext(cfg, rank, topo, role, device, links)
    for ranks in topo.instances:  # every rank creates every group, in one order
        if len(ranks) > 1:
            control = dist.new_group(list(ranks), timeout=timeout, backend="gloo")
            nccl = device.type == "cuda" and not cfg.share_device
            data = dist.new_group(list(ranks), timeout=timeout, backend="nccl") if nccl else control
            if rank in ranks:
                ctx.lockstep, ctx.tp_group = Lockstep(ranks, rank, control, cfg.timeouts.heartbeat_s), data
    _warm_up_data_links(ctx)
    dist.barrier()
    log.info("rank %d/%d: %s on %s, %d links", rank, world_size, role.value, device,
             len(links.all()))
    return ctx


def _check_alike(cfg: ServeConfig, per_node: int) -> None:
    """ConfigError unless every rank (every host) runs rank 0's config and ranks per host."""
    mine = (per_node, cfg.topology, cfg.model, cfg.dtype, cfg.device, cfg.transfer, cfg.engine)
    seen: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    for r, theirs in enumerate(seen):
        k, topo, *rest = theirs  # type: ignore[misc]
        if k != per_node:
            raise ConfigError(f"rank {r}'s host runs {k} ranks (--nproc-per-node), this rank's {per_node}: "
                              "every host must run the same number")
        if (topo, *rest) != mine[1:]:
            raise ConfigError(f"rank {r} runs another config ({topo.label}, model {rest[0]}) than this rank "
                              f"({cfg.topology.label}, model {cfg.model}): every host must run the same "
                              "`pd-local serve` flags but --node-rank")


def _create_links(cfg: ServeConfig, topo: Topology, rank: int, cuda_count: int,
                  timeout: datetime.timedelta, per_node: int) -> Links:
    """Create every group in one fixed order (all ranks call new_group for all of them) and
    keep the links this rank is an end of."""

    def make(src: int, dst: int, backend: str, device: torch.device) -> Link | None:
        group = dist.new_group([src, dst], timeout=timeout, backend=backend)
        if rank not in (src, dst):
            return None  # new_group returned GroupMember.NON_GROUP_MEMBER here
        return Link(f"{src}->{dst}", group, src, dst, rank, device, backend)

    cpu = torch.device("cpu")
    to_worker: dict[int, Link] = {}
    from_worker: dict[int, Link] = {}
    kv: dict[tuple[int, int], KVLink] = {}

    def keep(table: dict, key: object, link: Link | None) -> None:
        if link is not None:
            table[key] = link

    for w in topo.worker_ranks:
        keep(to_worker, w, make(0, w, "gloo", cpu))
    for w in range(1, topo.world_size):  # TP followers too: heartbeats, Fatal (liveness)
        keep(from_worker, w, make(w, 0, "gloo", cpu))
    for p, d in topo.kv_pairs:
        header = make(p, d, "gloo", cpu)
        dev_p = device_for_rank(p, cfg.device, cuda_count, per_node)
        dev_d = device_for_rank(d, cfg.device, cuda_count, per_node)
        # NCCL needs the two ends on different GPUs (module docstring); a same-GPU pair
        # (share_device) and every CPU pair use gloo, with the tensors in host memory.
        on_gpus = dev_p.type == "cuda" and (dev_p != dev_d or p // per_node != d // per_node)
        backend = "nccl" if on_gpus else "gloo"
        data_device = (dev_p if rank == p else dev_d) if on_gpus else cpu
        data = make(p, d, backend, data_device)
        if header is not None and data is not None:
            kv[(p, d)] = KVLink(header, data)
    return Links(to_worker, from_worker, kv)


def _warm_up_data_links(ctx: DistContext) -> None:
    """One tiny send per data link, in the one global pair order (no deadlock), so NCCL
    communicators are built, and a broken link fails, at start-up."""
    for (p, d), pair in sorted(ctx.links.kv.items()):
        link = pair.data
        probe = torch.full((1,), p * 1000 + d, dtype=torch.int64, device=link.device)
        if link.is_sender:
            dist.send(probe, d, group=link.group)
        else:
            got = torch.empty_like(probe)
            dist.recv(got, p, group=link.group)
            if int(got.item()) != p * 1000 + d:
                raise RuntimeError(f"data link {link.name}: warm-up got {int(got.item())}")
