"""A one-line tqdm progress bar on stderr, silent unless enabled on a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

_CHARSET = "-#"  # tqdm's bar characters: empty, full (no partial blocks)


class ProgressBar:
    """Requests done / total, or time elapsed / duration, redrawn at most every `min_interval` s:
    `done()` per request, `tick()` periodically, `close()` once."""

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
        n, bar_total, fmt = self._meter(0.0)
        self._bar = tqdm(total=bar_total, initial=n, file=self.stream, disable=not self.enabled,
                         bar_format=fmt, ascii=_CHARSET, mininterval=min_interval, leave=True)

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
        n, bar_total, fmt = self._meter(now - self.t0)
        self._bar.total, self._bar.n, self._bar.bar_format = bar_total, n, fmt
        self._bar.refresh()

    def _meter(self, elapsed: float) -> tuple[float, float, str]:
        """(tqdm's n, its total, its bar_format) for the state after `elapsed` seconds."""
        done = self.ok + self.failed
        fail = f"  failed {self.failed}" if self.failed else ""
        bar = f"[{{bar:{self.width}}}]"
        if self.total:
            return done, self.total, f"{bar} {{n}}/{{total}}{fail}  {{elapsed_s:.1f}}s"
        if self.duration:
            return (min(elapsed, self.duration), self.duration,
                    f"{bar} {done} done{fail}  {{elapsed_s:.1f}}/{self.duration:g}s")
        return 0, 1, f"{bar} {done} done{fail}  {{elapsed_s:.1f}}s"

    def render(self, elapsed: float) -> str:
        """The bar's text for `elapsed` seconds (pure, for tests)."""
        n, bar_total, fmt = self._meter(elapsed)
        return tqdm.format_meter(n, bar_total, elapsed, bar_format=fmt, ascii=_CHARSET)

    def close(self) -> None:
        if self.enabled:
            self.tick(force=True)
        self._bar.close()
