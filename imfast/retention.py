"""Message retention: ``MESSAGE_RETENTION_DAYS`` > 0 deletes older entries hourly.

``imfast serve`` (with or without ``--workers``) runs a :class:`Retention` of
its embedded store; in distributed mode the offline worker runs one on MySQL
within its own hourly clean-up
(:meth:`imfast.offline.worker.OfflineWorker.purge_once`).  Either way the
store's ``purge_messages`` keeps every conversation's highest seq as a floor,
so a seq is never handed out twice, and keeps cursors and receipts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["PURGE_BATCH", "PURGE_EVERY", "Retention", "RetentionCollector", "start_retention"]

log = logging.getLogger("imfast.retention")

PURGE_EVERY = 3600.0
PURGE_BATCH = 10_000  # rows per transaction: other writers wait at most one batch


class Retention:
    """Runs ``store.purge_messages`` at start and then every ``every`` seconds.

    A failed round is logged and tried again at the next one; ``purged`` counts
    the entries deleted since start.
    """

    def __init__(self, store: Any, days: float, every: float = PURGE_EVERY) -> None:
        if days <= 0:
            raise ValueError(f"retention needs a positive number of days, got {days}")
        self.store = store
        self.days = days
        self.every = every
        self.purged = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.purge_once()
            await asyncio.sleep(self.every)

    async def purge_once(self) -> int:
        """One round; returns the entries it deleted (0 after a failure)."""
        try:
            removed = int(await self.store.purge_messages(self.days * 24 * 3600, PURGE_BATCH))
        except Exception as exc:  # noqa: BLE001 - retried next round
            log.error("message retention clean-up failed: %s", exc)
            return 0
        self.purged += removed
        return removed

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


def start_retention(store: Any, settings: Any) -> Retention | None:
    """A running :class:`Retention` of ``store`` if ``MESSAGE_RETENTION_DAYS`` is set."""
    if not settings.message_retention_days:
        return None
    retention = Retention(store, settings.message_retention_days)
    retention.start()
    log.info("message retention on: entries older than %g days are deleted hourly",
             settings.message_retention_days)
    return retention


class RetentionCollector(Collector):
    """``im_messages_purged_total``, as the offline worker exports it."""

    def __init__(self, retention: Retention) -> None:
        self.retention = retention

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("im_messages_purged",
                                  "Conversation entries deleted by MESSAGE_RETENTION_DAYS",
                                  value=self.retention.purged)
