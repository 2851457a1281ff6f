"""``imfast service``: im-service, the routing role of a distributed deployment.

Wires the :class:`~imfast.service.router.Router` to Redis (dedup +
sequence), MySQL (log, cursors, groups, receipts, offline queue), etcd
(registry, read through its watch cache) and Kafka (``group_msg``,
``offline_msg``); serves gateways on ``SERVICE_PORT`` (9094) and health,
stats and metrics on ``HTTP_PORT``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from imfast.backends.composite import CompositeStore
from imfast.backends.metrics import BackendCollector
from imfast.config import ConfigError, Settings
from imfast.httpd import serve_http
from imfast.link.endpoints import LinkPool, LinkServer
from imfast.service.pusher import TOPIC_GROUP, TOPIC_OFFLINE, ClusterPusher
from imfast.service.remote import serve_router
from imfast.service.router import Router

__all__ = ["ServiceNode", "require"]

log = logging.getLogger("imfast.service")


def require(settings: Settings, *names: str) -> None:
    """Refuse to start without the backends this role needs."""
    missing = [env for env, attr in (("REDIS_URL", "redis_url"), ("KAFKA_BROKERS", "kafka_brokers"),
                                     ("ETCD_ENDPOINTS", "etcd_endpoints"),
                                     ("MYSQL_DSN", "mysql_dsn"))
               if env in names and not getattr(settings, attr)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} must be set for this role")


class _ServiceCollector(Collector):
    def __init__(self, node: ServiceNode) -> None:
        self.node = node

    def collect(self) -> Any:
        n = self.node
        routed = CounterMetricFamily("im_service_messages_routed", "Entries routed",
                                     labels=["route"])
        for route, count in n.pusher.routed.items():
            routed.add_metric([route], count)
        yield routed
        yield CounterMetricFamily("im_service_messages_accepted", "Entries stored",
                                  value=n.router.sent_total)
        yield CounterMetricFamily("im_service_duplicates", "Duplicate sends answered",
                                  value=n.router.duplicates_total)
        yield CounterMetricFamily("im_service_route_failures", "Pushes/publishes that failed",
                                  value=n.pusher.route_failures)
        yield GaugeMetricFamily("im_service_kafka_spooled",
                                "Kafka records held while the broker is down",
                                value=n.pusher.spooled)
        yield GaugeMetricFamily("im_service_gateway_links", "Connected gateway links",
                                value=len(n.link_server.connections))
        yield CounterMetricFamily(
            "im_service_seq_counter_initialisations",
            "Conversation counters (re)started in Redis from MySQL's highest seq: a new "
            "conversation, or a counter Redis lost", value=n.sequences.floor_lookups)
        for name, help_text, hist in n.router.histograms:
            yield hist.family(name, help_text)


class ServiceNode:
    """im-service: see module docstring."""

    def __init__(self, settings: Settings) -> None:
        require(settings, "REDIS_URL", "KAFKA_BROKERS", "ETCD_ENDPOINTS", "MYSQL_DSN")
        self.settings = settings
        self._closers: list[Any] = []
        self.started_at = time.time()

    async def start(self) -> int:
        from imfast.backends.etcd import EtcdRegistry
        from imfast.backends.kafka import KafkaBus
        from imfast.backends.mysql import MySQLStore
        from imfast.backends.redis import RedisSequenceStore

        s = self.settings
        mysql = await MySQLStore.open(
            s.mysql_dsn, s.db_max_open_conns, read_timeout=s.db_read_timeout,
            write_timeout=s.db_write_timeout)
        self._closers.append(mysql)
        self.mysql = mysql
        self.sequences = sequences = RedisSequenceStore(
            s.redis_url, dedup_ttl=s.dedup_ttl, floor_source=mysql.latest_seq)
        self._closers.append(sequences)  # closing one that never started is harmless
        start = getattr(sequences, "start", None)
        if start is not None:
            await start()
        self.store = CompositeStore(sequences, mysql)
        self.registry = EtcdRegistry(list(s.etcd_endpoints), owner="im-service")
        await self.registry.start()
        self._closers.append(self.registry)
        self.bus = KafkaBus(list(s.kafka_brokers), client_id="im-service",
                            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms)
        await self.bus.start()
        self._closers.append(self.bus)
        await self.bus.ensure_topics([TOPIC_GROUP, TOPIC_OFFLINE], s.kafka_topic_partitions,
                                     s.kafka_topic_replication)
        self.links = LinkPool()
        self._closers.append(self.links)
        self.pusher = ClusterPusher(self.registry, self.bus, self.links)
        self.router = Router(s, self.store, self.pusher)
        self.link_server = LinkServer(serve_router(self.router))
        self.port = await self.link_server.start(s.host, s.service_port)
        self._closers.append(self.link_server)
        metrics = CollectorRegistry(auto_describe=False)
        metrics.register(_ServiceCollector(self))
        metrics.register(BackendCollector(mysql=self.mysql))
        self.http = await serve_http(s.host, s.http_port, {
            "/health": lambda: (200, {"status": "ok", "hostname": s.display_hostname}),
            "/health/live": lambda: (200, {"status": "ok", "hostname": s.display_hostname}),
            "/stats": lambda: (200, self.stats()),
            "/metrics": lambda: (200, generate_latest(metrics), CONTENT_TYPE_LATEST),
        })
        self.http_port = int(self.http.sockets[0].getsockname()[1])
        log.info("im-service started port=%s http=%s", self.port, self.http_port)
        return self.port

    def stats(self) -> dict[str, Any]:
        return {
            "role": "service",
            "hostname": self.settings.display_hostname,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "messages_accepted": self.router.sent_total,
            "duplicates": self.router.duplicates_total,
            "routed": dict(self.pusher.routed),
            "route_failures": self.pusher.route_failures,
            "kafka_spooled": self.pusher.spooled,
            "gateway_links": len(self.link_server.connections),
            "route_all_offline": self.settings.route_all_offline,
        }

    async def drain(self, deadline: float = 30.0) -> None:
        await asyncio.sleep(0)

    async def stop(self) -> None:
        if getattr(self, "http", None) is not None:
            self.http.close()
        for c in reversed(self._closers):
            try:
                await c.close()
            except Exception:
                log.exception("close failed")
