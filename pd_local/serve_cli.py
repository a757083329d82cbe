"""`pd-local serve`: check the config, then exec torchrun with one process per rank.

    pd-local serve [--config configs/cpu-1p1d.toml] [--model DIR] [--dtype bfloat16|float32]
                   [--prefill P --decode D | --colocated N] [--device cpu|cuda] [...]

torchrun gets --nproc-per-node = 1 + workers and runs `python -m pd_local.launch` with the same
flags on every rank, so every rank builds the same ServeConfig. Mistakes that need no ranks (a
bad config, a missing model directory, too few GPUs) are refused here, before anything starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from pd_local.config import (ConfigError, ServeConfig, add_config_args, check_model_dir,
                             check_world, config_from_args, to_argv)


def torchrun_command(cfg: ServeConfig, args: argparse.Namespace) -> list[str]:
    """The torchrun command line for `cfg` (built from `args`)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # a free rendezvous port on localhost
        f"--nproc-per-node={cfg.topology.world_size}",
        f"--max-restarts={args.max_restarts}",
        "--module", "pd_local.launch", *to_argv(args.config, args),
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pd-local serve", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="torchrun restarts of the whole world after a rank fails")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print the torchrun command, start nothing")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        check_model_dir(cfg)
        cuda_count = 0
        if cfg.device == "cuda":
            import torch

            cuda_count = torch.cuda.device_count()
        check_world(cfg, cfg.topology.world_size, cuda_count)
    except ConfigError as e:
        print(f"pd-local serve: {e}", file=sys.stderr)
        return 2
    cmd = torchrun_command(cfg, args)
    print(f"pd-local serve: {cfg.topology.label} on {cfg.device}, {cfg.topology.world_size} "
          f"ranks: {' '.join(cmd)}", file=sys.stderr)
    if args.dry_run:
        return 0
    os.execv(sys.executable, cmd)  # torchrun takes over this process (and its signals)
