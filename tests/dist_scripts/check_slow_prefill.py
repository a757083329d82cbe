"""A prefill that lasts several group timeouts must complete, and no healthy rank may be declared
dead meanwhile (what once took a healthy 1P1D server down: a heartbeat stuck on a quiet KV
header link starved the prefill rank's other links, and a decode rank's single wait spanned the
whole prefill).

Real router, prefill and decode loops on a tiny model; the prefill rank's model call is made
slow (the prefill rank's `Engine._run`): 1.5 group timeouts before the forward, then half a group timeout per layer (3 layers:
3 group timeouts in all). Rank 0 submits a batch of requests through the router's Backend API
and checks that each one finishes with all its tokens and that the server is still healthy.

Run with `--model TINY_DIR --set engine.max_model_len=512 --set timeouts.group_s=2
--prefill 1 --decode D [--transfer whole]`. Prints 'RESULT rank R: ok' from every rank.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pd_local.cluster.worker
from common import say, start
from pd_local.cluster.dist import Role
from pd_local.engine.engine import Engine
from pd_local.engine.sampling import SamplingParams
from pd_local.launch import run_guarded

PROMPTS = [[1 + (5 * i + j) % 300 for j in range(8 + 13 * i)] for i in range(4)]
MAX_TOKENS = 4


async def submit_all(router) -> list:
    router.start(asyncio.get_running_loop())
    queues = [router.submit(i, p, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                 ignore_eos=True))
              for i, p in enumerate(PROMPTS)]
    results = []
    for q in queues:
        tokens = []
        while True:
            out = await q.get()
            assert out.error is None, out.error
            tokens += out.token_ids
            if out.finished:
                results.append((tokens, out.finish_reason))
                break
    return results


def main() -> None:
    ctx, _ = start(sys.argv[1:])
    group_s = ctx.cfg.timeouts.group_s
    real_run = Engine._run

    def slow_run(self, out, on_layer_kv=None):
        time.sleep(1.5 * group_s)

        def slow_layer(layer, k, v):
            time.sleep(0.5 * group_s)
            on_layer_kv(layer, k, v)
        return real_run(self, out, slow_layer)

    if ctx.role is Role.PREFILL:  # the decode ranks' steps run at full speed
        Engine._run = slow_run
    if ctx.role is Role.FRONTEND:
        from pd_local.cluster.router import Router

        router = Router(ctx)
        assert router.ready.wait(timeout=60), "the workers never became ready"
        t0 = time.monotonic()
        results = asyncio.run(submit_all(router))
        took = time.monotonic() - t0
        assert took > 3 * group_s, f"the prefill was not slow ({took:.1f} s)"
        assert all(len(t) == MAX_TOKENS and r == "length" for t, r in results), results
        healthy, why = router.healthy()
        assert healthy, why
        router.shutdown()
        assert router.clean_shutdown, router.error
        say(ctx, f"ok: {len(results)} requests in {took:.1f} s, group timeout {group_s} s")
    else:
        pd_local.cluster.worker.run(ctx)
        say(ctx, "ok")
    ctx.close()


if __name__ == "__main__":
    run_guarded(main)
