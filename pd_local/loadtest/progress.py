"""A one-line progress bar on stderr, for people watching a terminal.

Silent unless enabled and the stream is a TTY, so logs and CI output stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redrawn in place with `\\r`; at most every `min_interval` seconds unless forced.

    With `total` known the bar shows requests done / total; with only `duration` it shows time
    elapsed / duration. Callers: `done()` per finished request, `tick()` periodically,
    `close()` once at the end (prints the final state and a newline).
    """

    def __init__(self, total: int | None, duration: float | None, enabled: bool = True,
                 stream: TextIO | None = None, width: int = 30, min_interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.duration = duration
        self.width = width
        self.min_interval = min_interval
        self.ok = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self._last_draw = 0.0

    def done(self, success: bool) -> None:
        if success:
            self.ok += 1
        else:
            self.failed += 1
        self.tick()

    def tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render(now - self.t0))
        self.stream.flush()

    def render(self, elapsed: float) -> str:
        """The bar's text for `elapsed` seconds (pure, for tests)."""
        n = self.ok + self.failed
        if self.total:
            frac = n / self.total
            where = f"{n}/{self.total}"
        elif self.duration:
            frac = elapsed / self.duration
            where = f"{n} done"
        else:
            frac = 0.0
            where = f"{n} done"
        frac = min(max(frac, 0.0), 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        clock = f"{elapsed:.1f}s" if not self.duration else f"{elapsed:.1f}/{self.duration:g}s"
        fail = f"  failed {self.failed}" if self.failed else ""
        return f"[{bar}] {where}{fail}  {clock}"

    def close(self) -> None:
        if not self.enabled:
            return
        self.tick(force=True)
        self.stream.write("\n")
        self.stream.flush()
