"""The `pd-local serve` flags, shared by the command and the rank entry point `pd_local.launch`:
parsed into overrides of the TOML config (`config.load_config`), and handed on to every rank."""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

from pd_local.config import (API_KEY_ENV, DEVICES, DTYPES, ROUTING_POLICIES, TRANSFER_MODES,
                             ConfigError, ServeConfig, load_config)


def _parse_set(item: str) -> tuple[str, Any]:
    """'engine.max_num_seqs=32' -> ('engine.max_num_seqs', 32); the value is parsed as TOML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. engine.max_num_seqs=32), got {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: take it as a string (e.g. --set server.host=0.0.0.0)
    return key.strip(), value


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The serve flags shared by `pd-local serve` and the rank entry point `pd_local.launch`."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config (default: built-in defaults = configs/cpu-1p1d.toml)")
    parser.add_argument("--model", default=None, help="Hugging Face model directory")
    parser.add_argument("--dtype", choices=DTYPES, default=None)
    parser.add_argument("--device", choices=DEVICES, default=None)
    parser.add_argument("--transfer", choices=TRANSFER_MODES, default=None)
    parser.add_argument("--routing", choices=ROUTING_POLICIES, default=None)
    parser.add_argument("--prefill", type=int, default=None, help="prefill ranks (with --decode)")
    parser.add_argument("--decode", type=int, default=None, help="decode ranks (with --prefill)")
    parser.add_argument("--colocated", type=int, default=None, help="N colocated replicas")
    parser.add_argument("--elastic", type=int, default=None,
                        help="N workers that each prefill and decode, placed per request")
    parser.add_argument("--tp", type=int, default=None,
                        help="ranks per instance, tensor parallel (topology.tp)")
    parser.add_argument("--prefill-tp", type=int, default=None, help="ranks per prefill instance")
    parser.add_argument("--decode-tp", type=int, default=None, help="ranks per decode instance")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per worker rank (engine.threads; 0: auto, each its "
                             "share of the usable cores)")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set engine.max_num_seqs=32")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    overrides: dict[str, Any] = {
        "model": args.model, "dtype": args.dtype, "device": args.device,
        "transfer": args.transfer, "routing": args.routing, "engine.threads": args.threads,
        "server.host": args.host, "server.port": args.port,
        "server.api_key": args.api_key or os.environ.get(API_KEY_ENV) or None,
    }
    overrides.update(_parse_set(item) for item in args.set)
    tp = {k: v for k, v in (("tp", args.tp), ("prefill_tp", args.prefill_tp),
                            ("decode_tp", args.decode_tp)) if v is not None}
    pd = args.prefill is not None or args.decode is not None
    if pd or args.colocated is not None or args.elastic is not None:
        if pd + (args.colocated is not None) + (args.elastic is not None) > 1:
            raise ConfigError("give one of --prefill P --decode D, --colocated N or --elastic N")
        if pd and (args.prefill is None or args.decode is None):
            raise ConfigError("--prefill and --decode go together (or use --colocated N or --elastic N)")
        # Flags replace the file's whole topology table: mixing would make 1P1D + colocated.
        overrides["topology"] = (
            {"colocated": args.colocated} if args.colocated is not None
            else {"elastic": args.elastic} if args.elastic is not None
            else {"prefill": args.prefill, "decode": args.decode}
        ) | tp
    else:
        overrides.update((f"topology.{k}", v) for k, v in tp.items())
    return load_config(args.config, overrides)


def to_argv(cfg_path: str | Path | None, args: argparse.Namespace) -> list[str]:
    """The flags of `args` as an argv, so `pd-local serve` can hand them on to every rank.

    Not --api-key: that goes through the environment (API_KEY_ENV)."""
    argv: list[str] = []
    if cfg_path is not None:
        argv += ["--config", str(cfg_path)]
    for flag in ("model", "dtype", "device", "transfer", "routing",
                 "prefill", "decode", "colocated", "elastic", "tp", "prefill_tp", "decode_tp",
                 "threads", "host", "port"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.set:
        argv += ["--set", item]
    return argv
