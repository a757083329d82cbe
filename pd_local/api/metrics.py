"""Prometheus text-format metrics for the front-end, written by hand (no client library needed
for a handful of counters and histograms). Only the asyncio loop touches these objects."""

from __future__ import annotations

import bisect
from collections import Counter

from pd_local.api.backend import BackendStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.help = help_text
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for le, c in zip(self.buckets, self.counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cum}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {self.sum:.6f}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.disconnects = 0
        self.ttft = Histogram("pd_local_time_to_first_token_seconds", "Time from request arrival to its first token.")
        self.itl = Histogram("pd_local_inter_token_latency_seconds", "Gap between consecutive token outputs of a request.")
        self.e2e = Histogram("pd_local_e2e_request_latency_seconds", "Time from request arrival to its end.")

    def count_request(self, outcome: str) -> None:
        self.requests[outcome] += 1

    def count_disconnect(self) -> None:
        self.disconnects += 1

    def observe_ttft(self, s: float) -> None:
        self.ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        self.itl.observe(s)

    def observe_e2e(self, s: float) -> None:
        self.e2e.observe(s)

    def render(self, stats: BackendStats, in_flight: int) -> str:
        lines = ["# HELP pd_local_requests_total Requests by outcome (stop, length, abort, error, invalid, rejected).",
                 "# TYPE pd_local_requests_total counter"]
        for outcome in ("stop", "length", "abort", "error", "invalid", "rejected"):
            lines.append(f'pd_local_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
        lines += ["# HELP pd_local_client_disconnects_total Requests whose client went away before the end.",
                  "# TYPE pd_local_client_disconnects_total counter",
                  f"pd_local_client_disconnects_total {self.disconnects}",
                  "# HELP pd_local_requests_in_flight Requests admitted by the front-end and not finished.",
                  "# TYPE pd_local_requests_in_flight gauge",
                  f"pd_local_requests_in_flight {in_flight}"]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        gauges = (
            ("pd_local_kv_blocks_free", "Free KV blocks on a rank.", "free_blocks"),
            ("pd_local_kv_blocks_total", "Total KV blocks on a rank.", "total_blocks"),
            ("pd_local_running_requests", "Requests in a rank's running batch.", "running"),
            ("pd_local_queue_depth", "Requests queued on a rank (waiting for prefill or a reservation).", "waiting"),
        )
        for name, help_text, attr in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for r in stats.ranks:
                lines.append(f'{name}{{rank="{r.rank}",role="{r.role}"}} {getattr(r, attr)}')
        lines += ["# HELP pd_local_kv_transfer_bytes_total KV + hidden-state bytes moved prefill -> decode.",
                  "# TYPE pd_local_kv_transfer_bytes_total counter",
                  f"pd_local_kv_transfer_bytes_total {stats.kv_bytes_transferred}",
                  "# HELP pd_local_kv_transfer_seconds_total Time spent in those transfers.",
                  "# TYPE pd_local_kv_transfer_seconds_total counter",
                  f"pd_local_kv_transfer_seconds_total {stats.kv_transfer_seconds:.6f}",
                  "# HELP pd_local_kv_transfers_total Completed KV transfers.",
                  "# TYPE pd_local_kv_transfers_total counter",
                  f"pd_local_kv_transfers_total {stats.kv_transfers}"]
        return "\n".join(lines) + "\n"
