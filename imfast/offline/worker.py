"""``imfast offline-worker``: stores ``offline_msg`` records in MySQL and cleans up.

Guarantees: a record's Kafka offset is committed only after its row is in
``offline_messages`` (INSERT IGNORE on (user, conversation, seq), so a
redelivered record never makes a second row); rows older than
``OFFLINE_TTL_DAYS`` (7) are deleted in batches of 10,000, as the runbook's
manual clean-up does.  With ``MESSAGE_RETENTION_DAYS`` set, the same hourly
round deletes conversation entries older than that from ``messages``
(``MySQLStore.purge_messages``: sequence floors, cursors and receipts stay).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from imfast.backends.metrics import BackendCollector
from imfast.config import Settings
from imfast.httpd import serve_http
from imfast.retention import Retention
from imfast.service.node import require
from imfast.service.pusher import TOPIC_OFFLINE

__all__ = ["GROUP_OFFLINE", "OfflineWorker"]

log = logging.getLogger("imfast.offline")

GROUP_OFFLINE = "offline-worker"
TTL_SECONDS = 7 * 24 * 3600
PURGE_EVERY = 3600.0


class _Collector(Collector):
    def __init__(self, worker: OfflineWorker) -> None:
        self.worker = worker

    def collect(self) -> Any:
        yield CounterMetricFamily("im_offline_messages_stored", "offline_msg records stored",
                                  value=self.worker.stored)
        yield CounterMetricFamily("im_offline_messages_purged", "rows removed by the TTL",
                                  value=self.worker.purged)
        yield CounterMetricFamily("im_messages_purged",
                                  "conversation entries removed by MESSAGE_RETENTION_DAYS",
                                  value=self.worker.messages_purged)


class OfflineWorker:
    """See module docstring."""

    def __init__(self, settings: Settings) -> None:
        require(settings, "KAFKA_BROKERS", "MYSQL_DSN")
        self.settings = settings
        self.stored = 0
        self.purged = 0
        #: Made at the first clean-up round when MESSAGE_RETENTION_DAYS is set.
        self.retention: Retention | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = time.time()

    async def start(self) -> int:
        from imfast.backends.kafka import KafkaBus
        from imfast.backends.mysql import MySQLStore

        s = self.settings
        self.mysql = await MySQLStore.open(
            s.mysql_dsn, s.db_max_open_conns, read_timeout=s.db_read_timeout,
            write_timeout=s.db_write_timeout)
        self.bus = KafkaBus(list(s.kafka_brokers), client_id="offline-worker",
                            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms)
        await self.bus.start()
        await self.bus.ensure_topics([TOPIC_OFFLINE], s.kafka_topic_partitions,
                                     s.kafka_topic_replication)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.bus.consume(TOPIC_OFFLINE, GROUP_OFFLINE,
                                                             self.handle)))
        self._tasks.append(loop.create_task(self._purge_loop()))
        metrics = CollectorRegistry(auto_describe=False)
        metrics.register(_Collector(self))
        metrics.register(BackendCollector([(self.bus, GROUP_OFFLINE)], mysql=self.mysql))
        self.http = await serve_http(s.host, s.http_port, {
            "/health": lambda: (200, {"status": "ok", "hostname": s.display_hostname}),
            "/health/live": lambda: (200, {"status": "ok", "hostname": s.display_hostname}),
            "/stats": lambda: (200, {"role": "offline-worker", "stored": self.stored,
                                     "purged": self.purged,
                                     "messages_purged": self.messages_purged,
                                     "consumer_lag": sum(self.bus.consumer_lag().values())}),
            "/metrics": lambda: (200, generate_latest(metrics), CONTENT_TYPE_LATEST),
        })
        self.http_port = int(self.http.sockets[0].getsockname()[1])
        log.info("offline-worker started http=%s", self.http_port)
        return self.http_port

    async def handle(self, batch: list[tuple[bytes, bytes]]) -> None:
        """Store a batch of offline_msg records (before the offsets are committed)."""
        rows = []
        for _key, value in batch:
            try:
                user, conv, seq, msg_id = orjson.loads(value)
                rows.append((str(user), str(conv), int(seq), str(msg_id)))
            except Exception:  # noqa: BLE001 - a bad record must not stall the partition
                log.error("skipping unreadable offline_msg record (%d bytes)", len(value))
        if rows:
            await self.mysql.add_offline(rows)
        self.stored += len(rows)

    async def _purge_loop(self) -> None:
        while True:
            await self.purge_once()
            await asyncio.sleep(PURGE_EVERY)

    async def purge_once(self) -> None:
        """One clean-up round: the offline index's TTL, then message retention (if set).
        A failure is logged and retried next round."""
        try:
            removed = await self.mysql.purge_offline(TTL_SECONDS, 10000)
            self.purged += removed
            if removed:
                log.info("offline TTL clean-up removed rows=%s", removed)
        except Exception as exc:  # noqa: BLE001 - retried next round
            log.error("offline TTL clean-up failed: %s", exc)
        days = self.settings.message_retention_days
        if days and self.retention is None:
            self.retention = Retention(self.mysql, days)
        if self.retention is not None:
            await self.retention.purge_once()

    @property
    def messages_purged(self) -> int:
        """Conversation entries deleted by MESSAGE_RETENTION_DAYS since start."""
        return self.retention.purged if self.retention is not None else 0

    async def drain(self, deadline: float = 30.0) -> None:
        await asyncio.sleep(0)

    async def stop(self) -> None:
        """Close what is open (also after a start that failed half-way)."""
        for t in self._tasks:
            t.cancel()
        http = getattr(self, "http", None)
        if http is not None:
            http.close()
        for part in (getattr(self, "bus", None), getattr(self, "mysql", None)):
            if part is not None:
                try:
                    await part.close()
                except Exception:
                    log.exception("close failed")
