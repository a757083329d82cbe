"""Shared start-up of the worker scripts: config flags -> DistContext, rank-prefixed logging."""

from __future__ import annotations

import argparse
import os
import sys

from pd_local.config_flags import add_config_args, config_from_args
from pd_local.cluster.dist import DistContext, init_distributed
from pd_local.launch import setup_logging


def start(argv: list[str], extra: argparse.ArgumentParser | None = None
          ) -> tuple[DistContext, argparse.Namespace]:
    """Parse the serve flags (plus `extra`'s), join the world. No model directory needed."""
    parser = argparse.ArgumentParser(parents=[extra] if extra else [])
    add_config_args(parser)
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("RANK", "?"))
    return init_distributed(config_from_args(args)), args


def say(ctx: DistContext, text: str) -> None:
    """One result line for the test to grep: 'RESULT rank R: text'."""
    # One write per line: ranks share the pipe, and print() may write the newline separately.
    sys.stdout.write(f"RESULT rank {ctx.rank}: {text}\n")
    sys.stdout.flush()
