"""api/metrics.py: the /metrics exposition parses as Prometheus text, keeps the documented names
and labels, and two apps in one process keep separate registries."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pd_local.api.backend import FLIP_BUCKETS, BackendStats, Observed, RankStats
from pd_local.api.metrics import Metrics
from pd_local.engine.events import Load


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_names_labels_and_values() -> None:
    m = Metrics()
    m.count_request("stop")
    m.count_request("stop")
    m.count_disconnect()
    m.observe_ttft(0.02)
    m.observe_itl(0.3)
    m.observe_e2e(7.0)
    stats = BackendStats([RankStats(1, "prefill", Load(0, 0, 0, 2, 0, 5, 32)),
                          RankStats(2, "decode", Load(10, 64, 3, 1, 0, 4, 96), routed=5, routed_prefix_tokens=96)],
                         kv_bytes_transferred=4096, kv_transfer_seconds=0.25, kv_transfers=2)
    s = samples(m.render(stats, in_flight=3))
    assert s[("pd_local_requests_total", (("outcome", "stop"),))] == 2
    for outcome in ("length", "abort", "error", "invalid", "rejected"):  # exported from the start
        assert s[("pd_local_requests_total", (("outcome", outcome),))] == 0
    assert s[("pd_local_client_disconnects_total", ())] == 1
    assert s[("pd_local_requests_in_flight", ())] == 3
    assert s[("pd_local_kv_blocks_free", (("rank", "2"), ("role", "decode")))] == 10
    assert s[("pd_local_kv_blocks_total", (("rank", "2"), ("role", "decode")))] == 64
    assert s[("pd_local_running_requests", (("rank", "2"), ("role", "decode")))] == 3
    assert s[("pd_local_queue_depth", (("rank", "1"), ("role", "prefill")))] == 2
    assert s[("pd_local_kv_blocks_cached", (("rank", "2"), ("role", "decode")))] == 4
    assert s[("pd_local_prefix_cache_hit_tokens_total", (("rank", "1"), ("role", "prefill")))] == 32
    assert s[("pd_local_routed_requests_total", (("rank", "2"), ("role", "decode")))] == 5
    assert s[("pd_local_routed_prefix_tokens_total", (("rank", "2"), ("role", "decode")))] == 96
    assert s[("pd_local_routed_requests_total", (("rank", "1"), ("role", "prefill")))] == 0
    assert s[("pd_local_kv_transfer_bytes_total", ())] == 4096
    assert s[("pd_local_kv_transfer_seconds_total", ())] == 0.25
    assert s[("pd_local_kv_transfers_total", ())] == 2
    ttft = "pd_local_time_to_first_token_seconds"
    assert s[(f"{ttft}_bucket", (("le", "0.01"),))] == 0
    assert s[(f"{ttft}_bucket", (("le", "0.025"),))] == 1
    assert s[(f"{ttft}_count", ())] == 1 and s[(f"{ttft}_sum", ())] == 0.02
    assert s[("pd_local_inter_token_latency_seconds_bucket", (("le", "0.25"),))] == 0
    assert s[("pd_local_e2e_request_latency_seconds_bucket", (("le", "+Inf"),))] == 1
    assert not any(name.endswith("_created") for name, _ in s)


def test_two_apps_in_one_process_do_not_share_counts() -> None:
    a, b = Metrics(), Metrics()  # the global registry would refuse the second (duplicate names)
    a.count_request("error")
    assert samples(a.render(BackendStats(), 0))[("pd_local_requests_total", (("outcome", "error"),))] == 1
    assert samples(b.render(BackendStats(), 0))[("pd_local_requests_total", (("outcome", "error"),))] == 0


def test_elastic_modes_flips_and_migrations() -> None:
    stats = BackendStats([RankStats(1, "elastic", mode="prefill"), RankStats(2, "elastic", mode="decode"),
                          RankStats(3, "decode")],
                         migrations=3, migration_bytes=9000, flips={"prefill": 2, "mixed": 1},
                         demand={"prefill": 0.4, "decode": 0.25}, flip_seconds={"prefill": Observed(FLIP_BUCKETS), "mixed": Observed(FLIP_BUCKETS)})
    for mode, x in (("prefill", 0.04), ("prefill", 0.6), ("mixed", 0.0)):
        stats.flip_seconds[mode].add(x)
    for x in (0.03, 0.2, 40.0):
        stats.migration_seconds.add(x)
    s = samples(Metrics().render(stats, 0))
    assert s[("pd_local_rank_mode", (("mode", "prefill"), ("rank", "1")))] == 1
    assert s[("pd_local_rank_mode", (("mode", "decode"), ("rank", "2")))] == 1
    assert not any(name == "pd_local_rank_mode" and ("rank", "3") in labels for name, labels in s)
    assert s[("pd_local_flips_total", (("to", "prefill"),))] == 2 and s[("pd_local_flips_total", (("to", "mixed"),))] == 1
    lat = "pd_local_flip_seconds"
    assert s[(f"{lat}_bucket", (("le", "0.05"), ("to", "prefill")))] == 1
    assert s[(f"{lat}_bucket", (("le", "1.0"), ("to", "prefill")))] == 2
    assert s[(f"{lat}_count", (("to", "prefill"),))] == 2 and s[(f"{lat}_sum", (("to", "prefill"),))] == 0.64
    assert s[(f"{lat}_bucket", (("le", "+Inf"), ("to", "prefill")))] == 2
    assert s[(f"{lat}_bucket", (("le", "0.0"), ("to", "mixed")))] == 1
    assert s[("pd_local_migrations_total", ())] == 3 and s[("pd_local_migration_bytes_total", ())] == 9000
    mig = "pd_local_migration_seconds"
    assert s[(f"{mig}_bucket", (("le", "0.025"),))] == 0 and s[(f"{mig}_bucket", (("le", "0.05"),))] == 1
    assert s[(f"{mig}_bucket", (("le", "10.0"),))] == 2 and s[(f"{mig}_bucket", (("le", "+Inf"),))] == 3
    assert s[(f"{mig}_count", ())] == 3 and abs(s[(f"{mig}_sum", ())] - 40.23) < 1e-9
    assert s[("pd_local_mode_demand", (("work", "prefill"),))] == 0.4
    assert s[("pd_local_mode_demand", (("work", "decode"),))] == 0.25
    assert not any(name == "pd_local_mode_demand" for name, _ in samples(Metrics().render(BackendStats(), 0)))
