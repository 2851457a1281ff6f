"""Backend health metrics shared by every distributed role.

* ``im_backend_errors_total{backend}``: BackendUnavailable errors seen by
  this process (redis, mysql, etcd, kafka), for the MySQL/Kafka alerts;
* ``im_kafka_consumer_lag{topic,partition,group}``: how far this process's
  consumer is behind the partition's end, from the last fetch (no extra
  network call at scrape time).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from imfast.backends.errors import BACKEND_ERRORS

__all__ = ["BackendCollector"]

_BACKENDS = ("redis", "mysql", "etcd", "kafka")


class BackendCollector(Collector):
    """See module docstring; ``consumers`` is a list of (bus, group) pairs."""

    def __init__(self, consumers: list[tuple[Any, str]] | None = None) -> None:
        self.consumers = consumers or []

    def collect(self) -> Iterator[Any]:
        errors = CounterMetricFamily("im_backend_errors", "Backend unavailable errors",
                                     labels=["backend"])
        for backend in sorted(set(_BACKENDS) | set(BACKEND_ERRORS)):
            errors.add_metric([backend], BACKEND_ERRORS.get(backend, 0))
        yield errors
        lag = GaugeMetricFamily("im_kafka_consumer_lag", "Records behind the partition end",
                                labels=["topic", "partition", "group"])
        for bus, group in self.consumers:
            for (topic, partition), value in sorted(bus.consumer_lag().items()):
                lag.add_metric([topic, str(partition), group], value)
        yield lag
