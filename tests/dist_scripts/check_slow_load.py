"""Workers whose weights take 3 group timeouts to load must still come up: their receivers
and heartbeats run while they load (a gloo send waits for the peer's recv and fails after the
group timeout). Real router and worker loops; load_model made slow.

Run with `--model TINY_DIR --set engine.max_model_len=512 --set timeouts.group_s=2
[--prefill 1 --decode 1 | --colocated 1]`. Prints 'RESULT rank R: up' from every rank.
"""

from __future__ import annotations

import sys
import time

import pd_local.cluster.worker
from common import say, start
from pd_local.cluster.dist import Role
from pd_local.launch import run_guarded
from pd_local.model.weights import load_model


def main() -> None:
    ctx, _ = start(sys.argv[1:])

    def slow_load(*args, **kwargs):
        time.sleep(3 * ctx.cfg.timeouts.group_s)
        return load_model(*args, **kwargs)

    pd_local.cluster.worker.load_model = slow_load
    if ctx.role is Role.FRONTEND:
        from pd_local.cluster.router import Router

        router = Router(ctx)
        assert router.ready.wait(timeout=60), "the workers never became ready"
        assert router.error is None, router.error
        router.shutdown()
        assert router.clean_shutdown, router.error
    else:
        pd_local.cluster.worker.run(ctx)
    say(ctx, "up")
    ctx.close()


if __name__ == "__main__":
    run_guarded(main)
