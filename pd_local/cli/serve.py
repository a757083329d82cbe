"""`pd-local serve`: check the config, then exec torchrun with one process per rank.

    pd-local serve [--config configs/cpu-1p1d.toml] [--model DIR] [--dtype bfloat16|float32]
                   [--prefill P --decode D | --colocated N] [--device cpu|cuda] [...]

torchrun gets --nproc-per-node = 1 + workers and runs `python -m pd_local.launch` with the same
flags on every rank, so every rank builds the same ServeConfig (the API key travels in the
environment instead). Mistakes that need no ranks (a bad config, a missing model directory, too
few GPUs) are refused here, before anything starts; the default model is fetched if missing.
"""

from __future__ import annotations

import argparse
import os
import sys

from pd_local.config import (API_KEY_ENV, DEFAULT_MODEL, ConfigError, ServeConfig,
                             add_config_args, check_model_dir, check_world, config_from_args,
                             to_argv)


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
        if cfg.model == DEFAULT_MODEL and not cfg.model_path.is_dir():
            fetch_default_model(cfg)
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
    if cfg.server.api_key is not None:
        os.environ[API_KEY_ENV] = cfg.server.api_key
    os.execv(sys.executable, cmd)  # torchrun takes over this process (and its signals)
