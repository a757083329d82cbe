"""`pd-local serve`: check the config (fetching the default model if missing), then run torchrun
with one process per rank, each running `python -m pd_local.launch` with the same flags (the API
key travels in the environment), and supervise it for clean signals."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from pd_local.config import API_KEY_ENV, DEFAULT_MODEL, ConfigError, ServeConfig, check_model_dir, check_world
from pd_local.config_flags import add_config_args, config_from_args, to_argv


def fetch_default_model(cfg: ServeConfig) -> None:
    """The default model is fetched and converted on first use (README: `pd-local serve` on a
    fresh checkout just works); any other missing directory is the user's mistake."""
    from pd_local.cli.weights import DEFAULT_MODEL as NAME
    from pd_local.cli.weights import WeightsError, fetch

    print(f"pd-local serve: {cfg.model} not found; fetching {NAME}", file=sys.stderr)
    try:
        fetch(NAME, cfg.model_path.parent, dtype=None)
    except WeightsError as e:
        raise ConfigError(f"could not fetch the default model into {cfg.model_path}: {e}") from e


def torchrun_command(cfg: ServeConfig, args: argparse.Namespace) -> list[str]:
    """torchrun's command line: one host (--standalone), or node R's ranks R*K .. R*K+K-1."""
    if args.nnodes == 1:
        where = ["--standalone", f"--nproc-per-node={cfg.topology.world_size}"]
    else:
        where = [f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}",
                 f"--master-addr={args.master_addr}", f"--master-port={args.master_port}",
                 f"--nproc-per-node={args.nproc_per_node}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--max-restarts={args.max_restarts}",
            "--module", "pd_local.launch", *to_argv(args.config, args)]


def check_nodes(cfg: ServeConfig, args: argparse.Namespace) -> None:
    """ConfigError unless --nnodes x --nproc-per-node (filled in) is the topology's world."""
    world, n = cfg.topology.world_size, args.nnodes
    if n < 1 or not 0 <= args.node_rank < n:
        raise ConfigError(f"--node-rank {args.node_rank} is not one of the {n} nodes' 0..{n - 1}")
    if n == 1:
        return
    if args.master_addr is None or args.master_port is None:
        raise ConfigError(f"--nnodes {n}: give --master-addr and --master-port (node 0's address, "
                          "the same on every node)")
    if args.nproc_per_node is None:
        if world % n:
            raise ConfigError(f"topology {cfg.topology.label} has {world} ranks: they do not split evenly "
                              f"over {n} nodes (every node runs the same number)")
        args.nproc_per_node = world // n
    if n * args.nproc_per_node != world:
        raise ConfigError(f"topology {cfg.topology.label} needs {world} ranks, --nnodes {n} x "
                          f"--nproc-per-node {args.nproc_per_node} = {n * args.nproc_per_node}: every "
                          f"node must run {world / n:g} (the same on every node)")


def _without_api_key(argv: list[str]) -> list[str]:
    """argv less `--api-key KEY` / `--api-key=KEY`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--api-key":
            skip = True
        elif not a.startswith("--api-key="):
            out.append(a)
    return out


def main(argv: list[str]) -> int:
    if _without_api_key(argv) != argv:
        # This process lives as long as the server (it supervises torchrun): take the key off
        # its world-readable command line by running again with the key in the environment.
        key = next((a.split("=", 1)[1] for a in argv if a.startswith("--api-key=")), None)
        if key is None:
            i = argv.index("--api-key")
            key = argv[i + 1] if i + 1 < len(argv) else ""
        if key:
            os.environ[API_KEY_ENV] = key
            os.execv(sys.executable, [sys.executable, "-m", "pd_local", "serve",
                                      *_without_api_key(argv)])
    parser = argparse.ArgumentParser(prog="pd-local serve", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="torchrun restarts of the whole world after a rank fails")
    nodes = parser.add_argument_group("a world over several hosts (as torchrun's flags; the same on "
                                      "every node but --node-rank; the HTTP server runs on node 0)")
    nodes.add_argument("--nnodes", type=int, default=1)
    nodes.add_argument("--node-rank", type=int, default=0)
    nodes.add_argument("--master-addr", default=None, help="node 0's address, reachable from every node")
    nodes.add_argument("--master-port", type=int, default=None)
    nodes.add_argument("--nproc-per-node", type=int, default=None,
                       help="ranks on each node (default: the topology's ranks / --nnodes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print the torchrun command, start nothing")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.model == DEFAULT_MODEL and not cfg.model_path.is_dir():
            fetch_default_model(cfg)
        check_model_dir(cfg)
        cuda_count = 0
        if cfg.device == "cuda":
            import torch

            cuda_count = torch.cuda.device_count()
        check_nodes(cfg, args)
        check_world(cfg, cfg.topology.world_size, cuda_count, args.nproc_per_node)
    except ConfigError as e:
        print(f"pd-local serve: {e}", file=sys.stderr)
        return 2
    cmd = torchrun_command(cfg, args)
    node = f" (node {args.node_rank} of {args.nnodes})" if args.nnodes > 1 else ""
    print(f"pd-local serve: {cfg.topology.label} on {cfg.device}, {cfg.topology.world_size} "
          f"ranks{node}: {' '.join(cmd)}", file=sys.stderr)
    if args.dry_run:
        return 0
    if cfg.server.api_key is not None:
        os.environ[API_KEY_ENV] = cfg.server.api_key
    return supervise(cmd)


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def _ranks(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of this host's ranks: the children of torchrun's agent, by their RANK=."""
    out = {}
    for pid in children(torchrun_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        out.update((int(v[5:]), pid) for v in env if v.startswith(b"RANK=") and v[5:].isdigit())
    return out


def _die_with_parent() -> None:
    """In the torchrun child: SIGTERM it if `pd-local serve` dies (even by SIGKILL), so a
    killed supervisor never leaves a server running (Linux prctl; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def supervise(cmd: list[str]) -> int:
    """Run torchrun in its own session; SIGINT, SIGTERM and SIGHUP become one SIGTERM to rank 0
    (which drains every rank) or, on another host, to its ranks; a second signal kills the tree.
    Returns torchrun's exit code."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    received: list[int] = []

    def on_signal(sig: int, frame: object) -> None:
        received.append(sig)
        name = signal.Signals(sig).name
        if len(received) > 1:
            print(f"pd-local serve: {name} again: killing every rank now", file=sys.stderr,
                  flush=True)
            for pid in [*descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return
        ranks = _ranks(proc.pid)
        print(f"pd-local serve: {name}: stopping (Ctrl-C again to kill at once)",
              file=sys.stderr, flush=True)
        # Rank 0 drains every rank; another host's ranks ask it to (StopAsked). Before the ranks
        # exist, torchrun's agent is the one to stop.
        for pid in [ranks[0]] if 0 in ranks else ranks.values() or [proc.pid]:
            os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc
