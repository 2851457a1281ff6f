"""Backend health metrics shared by every distributed role.

* ``im_backend_errors_total{backend}``: BackendUnavailable errors seen by
  this process (redis, mysql, etcd, kafka), for the MySQL/Kafka alerts;
* ``im_kafka_consumer_lag{topic,partition,group}``: how far this process's
  consumer is behind the partition's end, from the last fetch (no extra
  network call at scrape time);
* ``im_kafka_handler_failures_total{group}``: fetched batches this process's
  consumer failed to handle (each is retried: a rising count is a stalled
  partition);
* ``im_mysql_pool_connections{state}``: the MySQL pool's ``max``, ``open``
  and ``idle`` connections, for roles that hold one.
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
    """See module docstring; ``consumers`` is a list of (bus, group) pairs, ``mysql`` a
    store with ``pool_stats()``."""

    def __init__(self, consumers: list[tuple[Any, str]] | None = None,
                 mysql: Any = None) -> None:
        self.consumers = consumers or []
        self.mysql = mysql

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
        failures = CounterMetricFamily("im_kafka_handler_failures",
                                       "Fetched batches the consumer failed to handle (retried)",
                                       labels=["group"])
        for bus, group in self.consumers:
            failures.add_metric([group], bus.handler_failures)
        yield failures
        if self.mysql is not None:
            pool = GaugeMetricFamily("im_mysql_pool_connections",
                                     "MySQL pool connections (max, open, idle)",
                                     labels=["state"])
            for state, value in sorted(self.mysql.pool_stats().items()):
                pool.add_metric([state], value)
            yield pool
