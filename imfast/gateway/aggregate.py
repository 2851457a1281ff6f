"""Node-wide ``/stats`` and ``/metrics`` from the reports of a node's gateway processes.

``imfast serve --workers N`` and ``imfast gateway --workers N`` run N gateway
processes behind one port; whichever answers ``/stats`` or ``/metrics`` must
report the whole node, with every field and metric one process reports.  So
each worker sends what it would itself answer (:func:`worker_report`: its own
``/stats`` and its metric families, collected as a scrape would) and the
supervisor merges them here, by rules that hold for fields and metrics added
later too:

* ``/stats``: numbers are summed, per key inside objects as well (``errors``,
  ``closes``); a flag is true only if it is true in every worker (e.g.
  ``service_link_connected``), except ``draining`` (true if any worker
  drains); a text or list the workers share is kept, differing ones become the
  sorted list of the workers' values (``advertise_addr``); the delivery P99
  is recomputed from the summed histogram; ``capacity``, ``hostname``,
  ``role``, ``uptime_seconds`` and ``workers`` are the node's own.
* ``/metrics``: samples with the same name and labels are summed (counters,
  histogram buckets, gauges such as open connections or consumer lag),
  except ``im_gateway_draining`` (the largest) and
  ``im_gateway_capacity_connections`` (the node's ``MAX_CONNECTIONS``).
* what the supervisor's own process holds (the embedded router's counters,
  store gauges and histograms) is added, and wins over a worker's field or
  family of the same name.

A worker that has not reported for :data:`STALE_AFTER` seconds (it died) is
left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from imfast.config import Settings
from imfast.gateway.metrics import LATENCY_BUCKETS, GatewayStats

__all__ = ["STALE_AFTER", "NodeAggregate", "merge_stats", "worker_report"]

#: Seconds after which a worker's last report no longer counts (workers report each second).
STALE_AFTER = 5.0
#: /stats flags true for the node when any worker's is (the others need every worker's).
_ANY_TRUE = frozenset({"draining"})
#: Metric families that are not summed over the workers.
_MAX_FAMILIES = frozenset({"im_gateway_draining"})
_CAPACITY_FAMILY = "im_gateway_capacity_connections"

#: One metric family as it travels: [name, type, help, [[sample name, labels, value], ...]].
WireFamily = list[Any]


def worker_report(stats: dict[str, Any], gateway_stats: GatewayStats,
                  registry: CollectorRegistry) -> dict[str, Any]:
    """What a worker sends its supervisor: its own /stats, latency counts and metrics."""
    families = [[m.name, m.type, m.documentation,
                 [[s.name, s.labels, s.value] for s in m.samples]]
                for m in registry.collect()]
    return {"stats": stats, "lat_counts": list(gateway_stats.lat_counts), "metrics": families}


def _merge_values(values: list[Any], key: str) -> Any:
    """One /stats field of the node from the workers' values of it (module docstring)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, bool):
        return any(present) if key in _ANY_TRUE else all(present)
    if isinstance(first, (int, float)):
        return sum(v for v in present if isinstance(v, (int, float)))
    if isinstance(first, dict):
        return merge_stats([v for v in present if isinstance(v, dict)])
    if all(v == first for v in present):
        return first
    if isinstance(first, list):  # differing lists: their union, in first-seen order
        return list(dict.fromkeys(x for v in present if isinstance(v, list) for x in v))
    return sorted({str(v) for v in present})


def merge_stats(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' /stats objects merged field by field (see module docstring)."""
    keys: dict[str, None] = {}
    for snap in snapshots:
        keys.update(dict.fromkeys(snap))
    return {key: _merge_values([snap.get(key) for snap in snapshots], key) for key in keys}


def _p99_upper_bound(lat_counts: list[int]) -> float | None:
    """GatewayStats.latency_quantile(0.99) of summed bucket counts."""
    stats = GatewayStats()
    stats.lat_counts = lat_counts
    stats.lat_n = sum(lat_counts)
    return stats.latency_quantile(0.99)


class _Families(Collector):
    """Serves already merged metric families."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def _merge_families(reports: list[list[WireFamily]], capacity: int) -> dict[str, Metric]:
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in reports:
        for name, typ, doc, samples in families:
            if name not in merged:
                merged[name] = Metric(name, doc, typ)
                values[name] = {}
            acc = values[name]
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                if name == _CAPACITY_FAMILY:
                    acc[key] = float(capacity)
                elif name in _MAX_FAMILIES:
                    acc[key] = max(acc.get(key, value), value)
                else:
                    acc[key] = acc.get(key, 0.0) + value
    for name, metric in merged.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    return merged


class NodeAggregate:
    """The supervisor's side: keeps each worker's last report, answers the node's figures.

    ``own_stats()`` gives the /stats fields of the supervisor's own process
    (the embedded router's); ``own_metrics()`` its metric families.
    """

    def __init__(self, settings: Settings, role: str,
                 own_stats: Callable[[], dict[str, Any]] | None = None,
                 own_metrics: Callable[[], Iterable[Metric]] | None = None) -> None:
        self.settings = settings
        self.role = role
        self.started_at = time.time()
        self._own_stats = own_stats
        self._own_metrics = own_metrics
        self.reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, worker: str, report: dict[str, Any]) -> list[Any]:
        """Keep ``worker``'s report; answer the node-wide [/stats object, /metrics text]."""
        now = time.monotonic()
        self.reports[worker] = (now, report)
        live = [r for at, r in self.reports.values() if now - at < STALE_AFTER]
        return [self.stats(live), self.metrics_text(live)]

    def stats(self, live: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.settings
        snap = merge_stats([r["stats"] for r in live])
        counts = [sum(c) for c in zip(*(r["lat_counts"] for r in live), strict=True)]
        snap.update({
            "capacity": s.max_connections,
            "hostname": s.display_hostname,
            "role": self.role,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "workers": len(live),
            "delivery_p99_seconds_upper_bound": _p99_upper_bound(
                counts or [0] * (len(LATENCY_BUCKETS) + 1)),
        })
        if self._own_stats is not None:
            snap.update(self._own_stats())
        return snap

    def metrics_text(self, live: list[dict[str, Any]]) -> str:
        merged = _merge_families([r["metrics"] for r in live], self.settings.max_connections)
        if self._own_metrics is not None:
            for family in self._own_metrics():
                merged[family.name] = family
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(merged.values()))
        return generate_latest(registry).decode()
