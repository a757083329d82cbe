"""The torchrun rank entry point: `python -m pd_local.launch [serve flags]`. Every rank builds the
same ServeConfig, joins the world and runs its role's `run(ctx)`. A failing rank logs and leaves
with `os._exit(1)` (interpreter shutdown could hang in gloo receives from a dead peer); signals:
shutdown.py."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from pd_local.config import ConfigError, check_model_dir
from pd_local.config_flags import add_config_args, config_from_args
from pd_local.cluster.shutdown import RankFailure, WorkerSignals, exit_now, install

log = logging.getLogger("pd_local.launch")

ROLE_MODULES: dict[str, str] = {
    "frontend": "pd_local.cluster.frontend",
    "prefill": "pd_local.cluster.worker",
    "decode": "pd_local.cluster.worker",
    "colocated": "pd_local.cluster.worker",
    "elastic": "pd_local.cluster.worker",
}


def setup_logging(rank: int | str, level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(name)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def run_guarded(main: Callable[[], object]) -> NoReturn:
    """Run `main`; exit 0 if it returns, 1 (os._exit, see the module docstring) if it raises.

    Config errors print one line; anything else its traceback.
    """
    code = 0
    try:
        main()
    except (ConfigError, RankFailure) as e:
        log.error("%s", e)
        code = 1
    except BaseException:  # noqa: BLE001 - includes KeyboardInterrupt: leave the same way
        log.error("rank failed:\n%s", traceback.format_exc())
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m pd_local.launch",
                                     description="one pd_local rank (started by torchrun)")
    add_config_args(parser)
    setup_logging(os.environ.get("RANK", "?"))
    cfg = config_from_args(parser.parse_args(argv))
    check_model_dir(cfg)  # every rank refuses alike, before any group exists
    rank = int(os.environ.get("RANK", "0"))
    signals = WorkerSignals(rank, cfg.server.shutdown_grace_s + 2 * cfg.timeouts.group_s)
    if rank == 0:  # until the router's own stop logic takes over (frontend.serve)
        install(lambda sig: exit_now(f"rank 0: {signal.Signals(sig).name} before serving"))
    else:
        install(signals)

    from pd_local.cluster.dist import init_distributed  # torch import: after the cheap checks

    ctx = init_distributed(cfg)
    ctx.signals = signals
    module = importlib.import_module(ROLE_MODULES[ctx.role.value])
    module.run(ctx)
    ctx.close()


def main(argv: list[str] | None = None) -> NoReturn:
    run_guarded(lambda: _main(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
