"""Whole elastic workers flip between mixed, mostly-prefill and mostly-decode as the work mix
shifts (docs/architecture.md, Elastic workers). Pure: the router feeds it the prefill share of
the work it measures; tests run it on traces."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Leave the current split only when the prefill share x n ranks is this far past the point where
# rounding would change it, and never within DWELL_S of the last flip: no oscillation on noise.
HYSTERESIS, DWELL_S = 0.2, 5.0
# The work rates are averaged over this many seconds (an exponential moving average).
RATE_TAU_S = 5.0


class Mode(enum.StrEnum):
    MIXED = "mixed"  # prefills and decodes, its own requests and others'
    PREFILL = "prefill"  # takes no new decodes; its running ones move away
    DECODE = "decode"  # prefills only what it decodes, or when prompts would miss their TTFT


@dataclass(frozen=True)
class Flip:
    rank: int
    to: Mode
    reason: str


class Rate:
    """Events per second, an exponential moving average over RATE_TAU_S."""

    def __init__(self) -> None:
        self.value, self.t = 0.0, None  # type: ignore[var-annotated]

    def add(self, now: float, amount: float) -> None:
        self.value = self.at(now) + amount / RATE_TAU_S
        self.t = now

    def at(self, now: float) -> float:
        return self.value if self.t is None else self.value * math.exp(-(now - self.t) / RATE_TAU_S)


def prefill_share(prompt_rate: float, token_rate: float, token_ms: float, decode_token_ms: float) -> float:
    """The share of the compute demand that is prefill: prompt tokens/s x ms each against
    generated tokens/s x ms each (0.5 when there is no demand)."""
    p, d = prompt_rate * token_ms, token_rate * decode_token_ms
    return 0.5 if p + d <= 0 else p / (p + d)


@dataclass
class ModePolicy:
    """`decide` once in a while (each time the router hears from a rank); flips it returns
    take effect at once in placement and migration."""

    modes: dict[int, Mode]
    last_flip: float = -math.inf
    history: list[tuple[float, int, Mode, str]] = field(default_factory=list)

    def split(self) -> int:
        return sum(m is Mode.PREFILL for m in self.modes.values())

    def decide(self, now: float, share: float, running: dict[int, int]) -> list[Flip]:
        """The flips that bring the number of mostly-prefill ranks to round(share x n), when that
        is neither 0 nor n (then every rank is mixed); `running`: each rank's decode batch."""
        n, k = len(self.modes), self.split()
        x = share * n
        if k == 0:  # all mixed: split only well inside (0.5, n - 0.5)
            want = round(x) if 0.5 + HYSTERESIS <= x <= n - 0.5 - HYSTERESIS else 0
        elif x < 0.5 - HYSTERESIS or x > n - 0.5 + HYSTERESIS:
            want = 0
        else:
            want = k if abs(x - k) <= 0.5 + HYSTERESIS else min(max(round(x), 1), n - 1)
        if (want == k and (k == 0 or Mode.MIXED not in self.modes.values())) or now - self.last_flip < DWELL_S:
            return []
        why = f"prefill share {share:.2f} of {n} ranks: {want} mostly-prefill (was {k})"
        if want == 0:
            target = dict.fromkeys(self.modes, Mode.MIXED)
        else:  # the ranks with the fewest running decodes prefill: the least to move away
            order = sorted(self.modes, key=lambda r: (self.modes[r] is not Mode.PREFILL, running.get(r, 0), r))
            target = {r: Mode.PREFILL if i < want else Mode.DECODE for i, r in enumerate(order)}
        flips = [Flip(r, m, why) for r, m in sorted(target.items()) if self.modes[r] is not m]
        for f in flips:
            self.modes[f.rank] = f.to
            self.history.append((now, f.rank, f.to, f.reason))
        self.last_flip = now if flips else self.last_flip
        return flips
