"""The merge rules of a multi-process node's /stats and /metrics (imfast.gateway.aggregate)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from imfast.config import Settings
from imfast.gateway.aggregate import NodeAggregate, merge_stats, worker_report
from imfast.gateway.metrics import GatewayStats
from imfast.gateway.server import Gateway


def test_stats_fields_merge_by_kind() -> None:
    merged = merge_stats([
        {"frames": 3, "lag": 1.5, "errors": {"rate_limited": 2}, "linked": True,
         "draining": False, "addr": "unix:/a", "features": ["x"], "p": None, "store": "S"},
        {"frames": 4, "lag": 0.5, "errors": {"rate_limited": 1, "bad": 1}, "linked": False,
         "draining": True, "addr": "unix:/b", "features": ["x"], "p": None, "store": "S",
         "only_here": 7},
    ])
    assert merged == {
        "frames": 7, "lag": 2.0, "errors": {"rate_limited": 3, "bad": 1},
        "linked": False,  # true only if every worker's is
        "draining": True,  # true if any worker drains
        "addr": ["unix:/a", "unix:/b"], "features": ["x"], "p": None, "store": "S",
        "only_here": 7,
    }


async def test_node_figures_sum_workers_and_keep_node_settings() -> None:
    settings = Settings(max_connections=1000, hostname="node-1")
    reports = []
    for delivered in (5, 7):
        gw = Gateway(settings, verifier=None, role="embedded")  # type: ignore[arg-type]
        gw.stats.retransmits = delivered
        gw.stats.observe_latency(0.004, delivered)
        gw.stats.send_ack.observe(0.002)
        reports.append(worker_report(gw.stats_snapshot(), gw.stats, gw.metrics_registry))
    node = NodeAggregate(settings, "embedded", own_stats=lambda: {"messages_accepted": 9})
    node.report("worker-0", reports[0])
    stats, text = node.report("worker-1", reports[1])
    assert stats["capacity"] == 1000 and stats["workers"] == 2
    assert stats["messages_accepted"] == 9  # the supervisor's own
    assert stats["delivery_p99_seconds_upper_bound"] == 0.005
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if not s.labels or s.labels.get("le") == "0.005"}
    assert samples["im_gateway_retransmits_total"] == 12
    assert samples["im_gateway_send_ack_duration_seconds_count"] == 2
    assert samples["im_gateway_message_delivery_duration_seconds_bucket"] == 12
    assert samples["im_gateway_capacity_connections"] == 1000  # not 2 x 1000


def test_a_silent_worker_drops_out_of_the_figures() -> None:
    settings = Settings()
    stats = GatewayStats()
    report = {"stats": {"frames_received": 1}, "lat_counts": list(stats.lat_counts),
              "metrics": []}
    node = NodeAggregate(settings, "gateway")
    node.report("worker-0", report)
    node.reports["worker-0"] = (node.reports["worker-0"][0] - 60, report)  # a minute ago
    figures, _ = node.report("worker-1", report)
    assert figures["workers"] == 1 and figures["frames_received"] == 1
