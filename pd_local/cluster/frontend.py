"""Rank 0's entry point: start the router, wait for the workers, serve the HTTP front-end with
uvicorn until a signal or a failure stops it, then shut every worker down in order."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pd_local.cluster.dist import DistContext, Role
from pd_local.cluster.router import Router
from pd_local.cluster.shutdown import RankFailure, Stopper, install

log = logging.getLogger(__name__)


def serve(ctx: DistContext) -> None:
    """Rank 0: wait for the workers, serve HTTP until stopped, shut the workers down.

    Stops (shutdown.py): a signal drains and stops every rank in order (returns: exit 0); a
    failure answers 503 for a moment, then raises RankFailure (exit 1, one log line)."""
    import uvicorn

    from pd_local.api.server import ServerSettings, create_app
    from pd_local.tokenizer import Tokenizer

    cfg = ctx.cfg
    router = Router(ctx)
    stopper = Stopper(router, cfg.server.shutdown_grace_s)
    install(stopper.on_signal)
    # A worker's signal (another host's `pd-local serve`): one drain, however many ranks ask.
    router.on_stop_asked = lambda sig: None if stopper.requested.is_set() else stopper.on_signal(sig)
    tokenizer = Tokenizer.from_dir(cfg.model)
    log.info("waiting for %d workers to load %s", len(ctx.topology.worker_ranks), cfg.model)
    while not router.ready.wait(timeout=0.2) and not stopper.requested.is_set():
        pass
    if router.error is None and not stopper.requested.is_set():
        from pd_local.model.dtype import read_cpu_flags, resolve_dtype_name

        # The workers resolved "auto" on this same machine from the same inputs: the same answer.
        dtype, why = resolve_dtype_name(cfg.dtype, cfg.device, read_cpu_flags())
        log.info("workers compute in %s (%s)", dtype, why)
        settings = ServerSettings(model_name=cfg.model_path.name, api_key=cfg.server.api_key,
                                  max_queue=cfg.server.max_queue,
                                  cors_origins=cfg.server.cors_origins, dtype=dtype)
        app = create_app(router, tokenizer, settings)
        server = _uvicorn_server(uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port,
                                                log_level="info", timeout_graceful_shutdown=5),
                                 stopper.on_signal)
        stopper.in_flight = lambda: app.state.pd.in_flight
        stopper.should_exit = lambda: setattr(server, "should_exit", True)
        router.on_fatal = stopper.on_failure
        log.info("serving %s (%s) on http://%s:%d", cfg.model, cfg.topology.label,
                 cfg.server.host, cfg.server.port)
        server.run()  # the app's lifespan calls router.shutdown() on the way out
    router.shutdown()  # no-op when the lifespan did it; covers a server that never started
    if not router.clean_shutdown:
        raise RankFailure(router.error or "the workers did not shut down cleanly")


def _uvicorn_server(config: object, on_signal: Callable[[int], None]) -> object:
    """uvicorn's Server with its signal handling replaced by `on_signal`: uvicorn's own stops
    accepting at once (clients would see refused connections, not 503) and afterwards re-raises
    the signal, so SIGTERM killed the rank (-15) instead of it exiting 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            on_signal(sig)

    return Server(config)


def run(ctx: DistContext) -> None:
    """Entry point for rank 0 (launch.py)."""
    assert ctx.role is Role.FRONTEND
    serve(ctx)
