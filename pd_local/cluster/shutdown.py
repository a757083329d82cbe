"""How ranks stop (docs/architecture.md, Stopping): rank 0 drains on a signal (503 to new
requests, `shutdown_grace_s` for those in flight, then Shutdown to the workers, exit 0); a worker
waits for rank 0's Shutdown; a second signal exits at once; after a failure rank 0 answers 503
for FAILURE_LINGER_S, then exits 1."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FAILURE_LINGER_S = 2.0  # rank 0 answers 503 this long after a failure before exiting
ABORT_DELIVERY_S = 10.0  # at most this long for aborted responses to go out after the grace


class RankFailure(RuntimeError):
    """A failure already explained in the log: the rank exits 1 with one line, no traceback."""


def exit_now(why: str, code: int = 1) -> None:
    """Leave at once without unwinding (daemon threads may sit in gloo calls; launch.py)."""
    log.warning("%s: exiting now", why)
    logging.shutdown()
    os._exit(code)


def install(handler: Callable[[int], None]) -> None:
    """Route every stop signal to `handler(signum)` (main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: handler(signum))


class WorkerSignals:
    """A worker's signal policy (module docstring): log once, wait for rank 0, fall back."""

    def __init__(self, rank: int, fallback_s: float) -> None:
        self.rank, self.fallback_s = rank, fallback_s
        self.received = 0
        self.ask: Callable[[int], None] | None = None  # asks rank 0 to stop (set once it can)

    def __call__(self, sig: int) -> None:
        name = signal.Signals(sig).name
        self.received += 1
        if self.received > 1:
            exit_now(f"rank {self.rank}: {name} again")
        log.warning("%s: asking rank 0 to stop the server (or exiting by itself in %.0f s)",
                    name, self.fallback_s)
        if self.ask is not None:  # a thread: the main thread may hold the link's lock
            threading.Thread(target=self.ask, args=(sig,), name="ask stop", daemon=True).start()
        timer = threading.Timer(self.fallback_s, exit_now,
                                args=(f"rank {self.rank}: rank 0 never stopped this rank",))
        timer.daemon = True
        timer.start()


class Stopper:
    """Rank 0's stop: drain on the first signal, exit on the second, and failure handling.
    `in_flight()` and `should_exit()` are set once the HTTP server exists; a signal before that
    is only recorded, for serve() to check."""

    def __init__(self, router: object, grace_s: float) -> None:
        self.router = router
        self.grace_s = grace_s
        self.signals = 0
        self.requested = threading.Event()
        self.in_flight: Callable[[], int] = lambda: 0
        self.should_exit: Callable[[], None] = lambda: None

    def on_signal(self, sig: int) -> None:
        """Runs in the main thread (a signal handler): never blocks."""
        name = signal.Signals(sig).name
        self.signals += 1
        if self.signals > 1:
            exit_now(f"rank 0: {name} again")
        self.requested.set()
        if self.router.error is not None:  # type: ignore[attr-defined]
            log.warning("%s: stopping after the failure above", name)
            return  # the failure's own linger ends the process
        log.warning("%s: stopping: new requests get 503; %d in flight get %.1f s to finish",
                    name, self.in_flight(), self.grace_s)
        self.router.begin_stop(f"the server is shutting down ({name})")  # type: ignore[attr-defined]
        threading.Thread(target=self._drain, name="drain", daemon=True).start()

    def _drain(self) -> None:
        self._wait_in_flight(self.grace_s)
        left = self.in_flight()
        if left:
            log.warning("grace period over: aborting %d requests still in flight", left)
            self.router.abort_all(  # type: ignore[attr-defined]
                f"the server is shutting down: not finished within the "
                f"{self.grace_s:g} s grace period")
            # Let the aborted responses reach their clients (error event, [DONE]) before the
            # HTTP server stops: it cuts any response still open a few seconds into its stop.
            self._wait_in_flight(ABORT_DELIVERY_S)
        self.should_exit()

    def _wait_in_flight(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)

    def on_failure(self) -> None:
        """The router failed (a rank died, a link broke): 503 for a while, then exit 1."""
        def linger() -> None:
            time.sleep(FAILURE_LINGER_S)
            self.should_exit()
        threading.Thread(target=linger, name="failure linger", daemon=True).start()
