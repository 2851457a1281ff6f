"""Wires roles and backends into a running node; start, drain, stop.

:class:`EmbeddedNode` is ``imfast serve``: gateway and router in one process
on the embedded store (SQLite file under ``DATA_DIR``, or memory when
``DATA_DIR`` is ``:memory:``).  It needs no external service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from imfast.auth import TokenVerifier
from imfast.backends.memory import MemoryStore
from imfast.backends.sqlite import SQLiteStore
from imfast.config import Settings
from imfast.gateway.server import Gateway
from imfast.retention import Retention, RetentionCollector, start_retention
from imfast.service.router import Router

__all__ = ["EmbeddedNode", "router_stats", "run_until_signalled"]

log = logging.getLogger("imfast.node")


def router_stats(router: Router, settings: Settings,
                 retention: Retention | None = None) -> dict[str, Any]:
    """The /stats fields of an embedded node's router (one process or ``--workers``)."""
    return {
        "messages_accepted": router.sent_total,
        "messages_purged": retention.purged if retention is not None else 0,
        "duplicates": router.duplicates_total,
        "commit_batches": router._committer.batches,
        "route_all_offline": settings.route_all_offline,
        "features_disabled": list(settings.features_disabled),
        "backends": {"store": type(router.store).__name__},
    }


class EmbeddedNode:
    """Gateway + router + embedded store in this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Any = None
        self.gateway: Gateway | None = None
        self.router: Router | None = None
        self.retention: Retention | None = None
        self.port = 0

    async def start(self) -> int:
        """Open the store, start listening; returns the HTTP/WebSocket port."""
        s = self.settings
        if s.data_dir == ":memory:":
            self.store = MemoryStore()
        else:
            self.store = SQLiteStore(os.path.join(s.data_dir, "imfast.db"), s.sqlite_synchronous)
        verifier = TokenVerifier(s, embedded=True)
        self.gateway = Gateway(s, verifier, role="embedded")
        self.router = Router(s, self.store, self.gateway)
        self.gateway.router = self.router
        router = self.router
        self.retention = start_retention(self.store, s)
        retention = self.retention
        self.gateway.extra_stats = lambda: router_stats(router, s, retention)
        if retention is not None:
            self.gateway.metrics_registry.register(RetentionCollector(retention))
        self.port = await self.gateway.start()
        return self.port

    async def drain(self, deadline: float = 30.0) -> None:
        """Stop taking connections and move clients off (SIGTERM does this)."""
        if self.gateway is not None:
            await self.gateway.start_drain("shutdown", deadline)

    async def stop(self) -> None:
        if self.retention is not None:
            await self.retention.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.router is not None:
            self.router.move_own_cursors()  # what waits for its batch, before the store closes
        if self.store is not None:
            await self.store.close()


async def run_until_signalled(node: Any, drain_deadline: float = 30.0) -> None:
    """Run ``node`` until SIGINT/SIGTERM; SIGTERM drains first, a second signal exits."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []

    def on_signal(name: str) -> None:
        signals.append(name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    await stop.wait()
    if signals[0] == "SIGTERM":
        log.warning("SIGTERM: draining before exit")
        stop.clear()
        drain = loop.create_task(node.drain(drain_deadline))
        waiter = loop.create_task(stop.wait())
        await asyncio.wait({drain, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
    await node.stop()
