"""The front-end's Prometheus metrics (names and labels: docs/api.md), in a registry of their own
per app. Request metrics are updated as requests end; per-rank gauges and transfer counters are
read from a `BackendStats` snapshot at scrape time. Only the asyncio loop touches them."""

from __future__ import annotations

from collections.abc import Iterator
from operator import attrgetter

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pd_local.api.backend import BackendStats, Observed

# The `_created` series prometheus_client adds to every counter and histogram by default carry
# nothing a scrape of this server needs, and /metrics never had them. (Process-wide switch.)
prometheus_client.disable_created_metrics()

# Seconds. TTFT runs from ~10 ms (a short prompt, idle server) to tens of seconds (queued behind
# long prompts on CPU); inter-token gaps from ~5 ms to a stall of seconds; one scale serves both.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("stop", "length", "abort", "error", "invalid", "rejected")
RANK_GAUGES = (
    ("pd_local_kv_blocks_free", "Free KV blocks on a rank.", "load.free_blocks"),
    ("pd_local_kv_blocks_total", "Total KV blocks on a rank.", "load.total_blocks"),
    ("pd_local_running_requests", "Requests in a rank's running batch.", "load.running"),
    ("pd_local_queue_depth", "Requests queued on a rank (waiting for prefill or a reservation).",
     "load.waiting"),
    ("pd_local_kv_blocks_cached", "Free KV blocks whose content the prefix cache keeps "
     "(counted in pd_local_kv_blocks_free; a prefill rank: its own prefill cache).",
     "load.cached_blocks"),
    ("pd_local_prefill_queued_tokens", "Prompt tokens routed to a rank to prefill and not yet "
     "prefilled or aborted (the router's view, what its prefill routing compares).",
     "queued_tokens"),
    ("pd_local_rank_threads", "CPU threads a rank computes with (engine.threads).", "threads"),
)
RANK_COUNTERS = (
    ("pd_local_prefix_cache_hit_tokens", "Prompt tokens whose KV came from a rank's prefix cache.",
     "load.prefix_hit_tokens"),
    ("pd_local_routed_requests", "Requests the router sent to a rank.", "routed"),
    ("pd_local_routed_prefix_tokens", "Prompt tokens the router expected a rank to hold "
     "cached when it routed a request there (routing = prefix; 0 otherwise).",
     "routed_prefix_tokens"),
)


class _SnapshotCollector(Collector):
    """Metrics whose values live in the backend (read from the last `BackendStats`)."""

    def __init__(self) -> None:
        self.stats = BackendStats(ranks=[])
        self.in_flight = 0

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("pd_local_requests_in_flight",
                              "Requests admitted by the front-end and not finished.")
        g.add_metric([], self.in_flight)
        yield g
        for name, help_text, attr in RANK_GAUGES:
            g = GaugeMetricFamily(name, help_text, labels=["rank", "role"])
            for r in self.stats.ranks:
                g.add_metric([str(r.rank), r.role], attrgetter(attr)(r))
            yield g
        for name, help_text, attr in RANK_COUNTERS:  # exported as NAME_total
            c = CounterMetricFamily(name, help_text, labels=["rank", "role"])
            for r in self.stats.ranks:
                c.add_metric([str(r.rank), r.role], attrgetter(attr)(r))
            yield c
        s = self.stats
        g = GaugeMetricFamily("pd_local_rank_mode", "1 for an elastic rank's current mode "
                              "(mixed, prefill, decode; cluster/modes.py).", labels=["rank", "mode"])
        for r in s.ranks:
            if r.mode:
                g.add_metric([str(r.rank), r.mode], 1)
        yield g
        g = GaugeMetricFamily("pd_local_mode_demand", "The work the mode policy measures, in busy "
                              "ranks (prefill, decode; 5 s averages).", labels=["work"])
        for work, v in sorted(s.demand.items()):
            g.add_metric([work], v)
        yield g
        c = CounterMetricFamily("pd_local_flips", "Elastic ranks' mode changes, by the new mode.",
                                labels=["to"])
        for mode, n in sorted(s.flips.items()):
            c.add_metric([mode], n)
        yield c
        h = HistogramMetricFamily("pd_local_flip_seconds", "From a flip to its taking effect (to "
                                  "prefill: its last decode moved away).", labels=["to"])
        for mode, o in sorted(s.flip_seconds.items()):
            h.add_metric([mode], buckets(o), o.sum)
        yield h
        h = HistogramMetricFamily("pd_local_migration_seconds", "A moved request's stall: stopped on "
                                  "one elastic worker until decoding on the other.")
        if s.migration_seconds.counts:
            h.add_metric([], buckets(s.migration_seconds), s.migration_seconds.sum)
        yield h
        for name, help_text, value in (
            ("pd_local_kv_transfer_bytes", "KV + hidden-state bytes moved prefill -> decode.",
             s.kv_bytes_transferred),
            ("pd_local_kv_transfer_seconds", "Time spent in those transfers.", s.kv_transfer_seconds),
            ("pd_local_kv_transfers", "Completed KV transfers.", s.kv_transfers),
            ("pd_local_migrations", "Running requests moved between elastic workers.", s.migrations),
            ("pd_local_migration_bytes", "KV bytes those moves sent.", s.migration_bytes),
        ):
            yield CounterMetricFamily(name, help_text, value=value)  # exported as NAME_total


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pd_local_requests", "Requests by outcome (stop, length, abort, error, invalid, rejected).",
            ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.disconnects = Counter("pd_local_client_disconnects",
                                   "Requests whose client went away before the end.",
                                   registry=self.registry)
        self._snapshot = _SnapshotCollector()
        self.registry.register(self._snapshot)
        self.ttft = Histogram("pd_local_time_to_first_token_seconds",
                              "Time from request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("pd_local_inter_token_latency_seconds",
                             "Gap between consecutive token outputs of a request.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("pd_local_e2e_request_latency_seconds",
                             "Time from request arrival to its end.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def count_request(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def count_disconnect(self) -> None:
        self.disconnects.inc()

    def observe_ttft(self, s: float) -> None:
        self.ttft.observe(s)

    def observe_itl(self, s: float) -> None:
        self.itl.observe(s)

    def observe_e2e(self, s: float) -> None:
        self.e2e.observe(s)

    def render(self, stats: BackendStats, in_flight: int) -> str:
        """The text exposition (format 0.0.4) of everything, with the backend's state as of now."""
        self._snapshot.stats, self._snapshot.in_flight = stats, in_flight
        return prometheus_client.generate_latest(self.registry).decode()


def buckets(o: Observed) -> list[tuple[str, float]]:
    """Cumulative, as Prometheus wants them."""
    out, n = [], 0
    for bound, count in zip((*map(str, o.bounds), "+Inf"), o.counts):
        n += count
        out.append((bound, n))
    return out
