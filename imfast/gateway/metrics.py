"""Gateway counters and their Prometheus exposition.

The hot path only bumps plain integers on :class:`GatewayStats` (a labelled
prometheus-client counter costs a lookup and a lock per call); the
:class:`GatewayCollector` turns them into metric families when ``/metrics`` is
scraped.  Metric names are the ones in CONTRACT.md and the runbooks' PromQL.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "GatewayCollector", "GatewayStats", "Histogram"]

#: Delivery latency buckets (seconds), dense around the 150/200 ms SLO lines.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                   0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A latency histogram cheap enough for the hot path (plain ints, one bisect)."""

    __slots__ = ("counts", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        buckets = []
        acc = 0
        for bound, count in zip(LATENCY_BUCKETS, self.counts):
            acc += count
            buckets.append((repr(bound), acc))
        buckets.append(("+Inf", self.n))
        return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=self.total)


class GatewayStats:
    """Plain counters, cheap to bump from the hot path."""

    __slots__ = (
        "auth_failures",
        "closes",
        "connections_opened",
        "delivered",
        "dropped",
        "errors",
        "failed",
        "frames_in",
        "internal_errors",
        "lat_counts",
        "lat_n",
        "lat_sum",
        "refused",
        "retransmits",
        "send_ack",
        "slow_consumers",
    )

    def __init__(self) -> None:
        self.connections_opened = 0
        self.frames_in = 0
        self.delivered = 0
        self.dropped = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.closes: dict[int, int] = {}
        self.auth_failures = 0
        self.slow_consumers = 0
        self.internal_errors = 0
        self.refused: dict[str, int] = {}
        self.retransmits = 0
        self.send_ack = Histogram()  # send frame handled -> `sent` queued (includes the store)
        self.lat_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_n = 0

    def observe_latency(self, seconds: float, n: int = 1) -> None:
        """Record ``n`` deliveries that each took ``seconds``."""
        self.lat_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.lat_sum += seconds * n
        self.lat_n += n

    def latency_quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None with no data)."""
        if not self.lat_n:
            return None
        rank = q * self.lat_n
        seen = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.lat_counts):
            seen += count
            if seen >= rank:
                return bound
        return float("inf")


class GatewayCollector(Collector):
    """Exposes one gateway's :class:`GatewayStats` and live gauges."""

    def __init__(self, stats: GatewayStats, gauges: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats
        self._gauges = gauges

    def collect(self) -> Iterator[Any]:
        s = self._stats
        g = self._gauges()
        yield GaugeMetricFamily("im_gateway_active_connections",
                                "Open WebSocket connections on this gateway",
                                value=g["active_connections"])
        yield GaugeMetricFamily("im_gateway_authenticated_connections",
                                "Authenticated connections", value=g["authenticated"])
        yield GaugeMetricFamily("im_gateway_capacity_connections",
                                "MAX_CONNECTIONS of this gateway", value=g["capacity"])
        yield GaugeMetricFamily("im_gateway_draining", "1 while draining", value=g["draining"])
        yield GaugeMetricFamily("im_gateway_write_buffer_bytes",
                                "Bytes queued to clients (sampled)", value=g["write_buffer"])
        delivered = CounterMetricFamily("im_gateway_messages_delivered",
                                        "Deliveries to client devices", labels=["status"])
        delivered.add_metric(["success"], s.delivered)
        delivered.add_metric(["dropped"], s.dropped)
        delivered.add_metric(["failed"], s.failed)
        yield delivered
        buckets = []
        acc = 0
        for bound, count in zip(LATENCY_BUCKETS, s.lat_counts):
            acc += count
            buckets.append((repr(bound), acc))
        buckets.append(("+Inf", s.lat_n))
        yield HistogramMetricFamily(
            "im_gateway_message_delivery_duration_seconds",
            "From the message's acceptance to its push to a device",
            buckets=buckets, sum_value=s.lat_sum)
        yield s.send_ack.family("im_gateway_send_ack_duration_seconds",
                                "From a client's send to its `sent` acknowledgement (one hop "
                                "to the router and the durable store)")
        for name, help_text, hist in g.get("histograms", ()):
            yield hist.family(name, help_text)
        for _key, name, help_text, value in g.get("store_gauges", ()):
            yield GaugeMetricFamily(name, help_text, value=value)
        errors = CounterMetricFamily("im_gateway_errors", "Errors reported to clients or hit",
                                     labels=["kind"])
        for kind, n in sorted(s.errors.items()):
            errors.add_metric([kind], n)
        errors.add_metric(["auth_failed_connect"], s.auth_failures)
        errors.add_metric(["slow_consumer"], s.slow_consumers)
        errors.add_metric(["internal_exception"], s.internal_errors)
        yield errors
        closes = CounterMetricFamily("im_gateway_closes", "Connections closed by the gateway",
                                     labels=["code"])
        for code, n in sorted(s.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        refused = CounterMetricFamily("im_gateway_connections_refused",
                                      "Upgrades refused", labels=["reason"])
        for reason, n in sorted(s.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily("im_gateway_connections_opened", "Accepted connections",
                                  value=s.connections_opened)
        yield CounterMetricFamily("im_gateway_frames_received", "Client messages received",
                                  value=s.frames_in)
        yield CounterMetricFamily("im_gateway_retransmits", "Sessions re-sent unacked entries",
                                  value=s.retransmits)
        yield CounterMetricFamily("im_gateway_socket_writes", "write() calls to client sockets",
                                  value=g["writes"])
        for name, help_text, value in g.get("extra", ()):
            yield CounterMetricFamily(name, help_text, value=value)
