"""Whole elastic workers flip between mixed, mostly-prefill and mostly-decode as the work mix
shifts (docs/architecture.md, Elastic workers). Pure: the router feeds it the prefill and decode
demand it measures; tests run it on traces."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from pd_local.config import ModesConfig

# A split (some ranks mostly-prefill, the rest mostly-decode) needs both kinds of work to matter
# (the prefill share of it within SHARE) and each side to carry its own at no more than UTIL of
# its ranks; entering asks the first bounds, staying the second (hysteresis). No flip within
# DWELL_S of the last: no oscillation on noise. The times are config `[modes]`'s defaults.
SHARE_ENTER, SHARE_STAY = (0.25, 0.75), (0.15, 0.85)
UTIL_ENTER, UTIL_STAY = 0.7, 0.9
DWELL_S = ModesConfig.dwell_s
# ... and a new split must be wanted this long first: the averages pass through a mix on their
# way from one phase to the next (prefill-heavy -> decode-heavy looks balanced for a few seconds).
CONFIRM_S = ModesConfig.confirm_s
# The work rates are averaged over this many seconds (an exponential moving average).
RATE_TAU_S = ModesConfig.rate_tau_s


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
    """Events per second, an exponential moving average over tau_s, bias-corrected for the
    time since the first event (an average started at 0 would read low for the first seconds)."""

    def __init__(self, tau_s: float = RATE_TAU_S) -> None:
        self.tau_s = tau_s
        self.value, self.t, self.t0 = 0.0, 0.0, None  # type: ignore[var-annotated]

    def add(self, now: float, amount: float) -> None:
        self.t0 = now if self.t0 is None else self.t0
        self.value = self._decayed(now) + amount / self.tau_s
        self.t = now

    def _decayed(self, now: float) -> float:
        return self.value * math.exp(-(now - self.t) / self.tau_s)

    def age(self, now: float) -> float:
        return 0.0 if self.t0 is None else now - self.t0

    def at(self, now: float) -> float:
        seen = 1 - math.exp(-self.age(now) / self.tau_s)  # the average's weight so far
        return self._decayed(now) / seen if seen > 0 else 0.0


@dataclass
class ModePolicy:
    """`decide` once in a while (each time the router hears from a rank); flips it returns
    take effect at once in placement and migration."""

    modes: dict[int, Mode]
    last_flip: float = -math.inf
    history: list[tuple[float, int, Mode, str]] = field(default_factory=list)
    wanted: tuple[int, float] = (0, 0.0)  # the split last wanted, since when
    pinned: bool = False  # the operator sets the modes (POST /v1/cluster/mode): decide() waits
    dwell_s: float = DWELL_S
    confirm_s: float = CONFIRM_S

    def check(self, rank: int, mode: Mode) -> None:
        """ValueError, naming the problem, unless rank may take mode."""
        if rank not in self.modes:
            raise ValueError(f"rank {rank} is not an elastic worker (those are {sorted(self.modes)})")
        if mode is Mode.PREFILL and all(m is Mode.PREFILL for r, m in self.modes.items() if r != rank):
            raise ValueError(f"rank {rank} is the last rank that decodes: in prefill mode none would")

    def pin(self, now: float, rank: int, mode: Mode | None) -> Flip | None:
        """The operator's mode for rank (None: the policy decides again, a dwell from now)."""
        if mode is not None:
            self.check(rank, mode)  # refused: nothing changes
        self.pinned, self.last_flip, self.wanted = mode is not None, now, (self.split(), now)
        if mode is None or self.modes[rank] is mode:
            return None
        self.modes[rank] = mode
        self.history.append((now, rank, mode, "set by the operator"))
        return Flip(rank, mode, "set by the operator")

    def split(self) -> int:
        return sum(m is Mode.PREFILL for m in self.modes.values())

    def want(self, prefill: float, decode: float, staying: bool) -> int:
        """Mostly-prefill ranks for this demand (in busy ranks): enough to carry the prefill
        at UTIL, if the rest carry the decode at UTIL; 0 (all mixed) otherwise."""
        n, util = len(self.modes), UTIL_STAY if staying else UTIL_ENTER
        lo, hi = SHARE_STAY if staying else SHARE_ENTER
        share = prefill / (prefill + decode) if prefill + decode > 0 else 0.0
        k = max(1, math.ceil(prefill / util))
        if not lo <= share <= hi or k + max(1, math.ceil(decode / util)) > n:
            return 0
        return min(max(k, self.split()), n - 1) if staying else k

    def decide(self, now: float, prefill: float, decode: float, running: dict[int, int]) -> list[Flip]:
        """The flips to `want`'s split (`running`: each rank's decode batch)."""
        if self.pinned:
            return []
        k = self.split()
        want = self.want(prefill, decode, staying=k > 0)
        if want != self.wanted[0]:
            self.wanted = (want, now)
        if (want == k and (k == 0 or Mode.MIXED not in self.modes.values())) or now - self.last_flip < self.dwell_s \
                or now - self.wanted[1] < self.confirm_s:
            return []
        n = len(self.modes)
        why = f"demand {prefill:.2f} prefill + {decode:.2f} decode ranks of {n}: {want} mostly-prefill (was {k})"
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
