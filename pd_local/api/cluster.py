"""`GET /v1/cluster`: every rank's role, load, KV blocks and throughput, as one JSON object.

The web page polls it about once a second; rates are differences of the ranks' cumulative
token counters between this call and an earlier one at least `RATE_WINDOW_S` old.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from pd_local.api.backend import BackendStats, RankStats

RATE_WINDOW_S = 2.0  # long enough to hold a few decode steps of a slow CPU, short enough to follow load


class RateMeter:
    """Tokens/s per rank from cumulative counters sampled at each call (no thread of its own)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[int, tuple[int, int]]]] = deque()

    def rates(self, ranks: list[RankStats], now: float) -> dict[int, tuple[float, float]]:
        """{rank: (prefill tokens/s, generated tokens/s)} since the newest sample at least
        `window_s` old (or the oldest one there is); 0 on the first call."""
        counts = {r.rank: (r.prefilled_tokens, r.generated_tokens) for r in ranks}
        while len(self._samples) > 1 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()
        base = self._samples[0] if self._samples else None
        self._samples.append((now, counts))
        out = {}
        for rank, (p, g) in counts.items():
            if base is None or now <= base[0] or rank not in base[1]:
                out[rank] = (0.0, 0.0)
            else:
                dt = now - base[0]
                p0, g0 = base[1][rank]
                out[rank] = (round((p - p0) / dt, 2), round((g - g0) / dt, 2))
        return out


def cluster_view(stats: BackendStats, meter: RateMeter, *, model: str, healthy: bool, detail: str,
                 in_flight: int, now: float | None = None) -> dict[str, Any]:
    """The `/v1/cluster` body (docs/api.md). KV blocks: used + cached + free = total."""
    rates = meter.rates(stats.ranks, time.monotonic() if now is None else now)
    ranks = []
    for r in sorted(stats.ranks, key=lambda r: r.rank):
        prefill_rate, decode_rate = rates[r.rank]
        load = r.load
        ranks.append({
            "rank": r.rank, "role": r.role, "running": load.running, "waiting": load.waiting,
            "kv_blocks": {"total": load.total_blocks, "used": load.total_blocks - load.free_blocks,
                          "cached": load.cached_blocks, "free": load.free_blocks - load.cached_blocks},
            "queued_prefill_tokens": r.queued_tokens,
            "prefilled_tokens": r.prefilled_tokens, "generated_tokens": r.generated_tokens,
            "prefill_tokens_per_s": prefill_rate, "decode_tokens_per_s": decode_rate,
            "threads": r.threads, "cpus": r.cpus, **({"mode": r.mode} if r.mode else {}),
        })
    return {
        "object": "cluster", "model": model, "status": "ok" if healthy else "unavailable",
        "detail": detail, "in_flight": in_flight, "ranks": ranks,
        **({"mode_control": stats.mode_control} if stats.mode_control else {}),
        **({"demand": {k: round(v, 3) for k, v in stats.demand.items()}} if stats.demand else {}),
        "kv_transfer": {"bytes": stats.kv_bytes_transferred,
                        "seconds": round(stats.kv_transfer_seconds, 6), "count": stats.kv_transfers},
    }
