"""How im-service hands committed entries to the gateways (distributed mode).

* private conversation: every online device of both users, found in the
  registry cache, gets the entry over a push link to its gateway (9093),
  one push per gateway per batch; a user with no online device gets an
  ``offline_msg`` record (the offline worker stores it in MySQL);
* group conversation: one ``group_msg`` record carrying the members at commit
  time; a gateway in ``gateway-group`` fans it out (locally, to other
  gateways over 9093, and to ``offline_msg`` for members with no device);
* with no message bus (``imfast serve --workers N``), group entries are routed
  like private ones, and nothing is queued for offline users: the store
  already holds every entry for their next sync;
* events (typing, receipts) go straight to the users' gateways; they are
  droppable, so an unreachable gateway just misses them.

Nothing here can lose an acknowledged message: entries are durable before
they get here, and a client that missed a push gets the entry by sync or
resume (its session detects the gap at the next entry).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson

from imfast.backends.base import StoredMessage
from imfast.link.endpoints import LinkPool
from imfast.service.remote import entry_to_wire

__all__ = ["ClusterPusher", "TOPIC_GROUP", "TOPIC_OFFLINE"]

log = logging.getLogger("imfast.service")

TOPIC_GROUP = "group_msg"
TOPIC_OFFLINE = "offline_msg"


class ClusterPusher:
    """Implements the router's Pusher for a cluster; see module docstring."""

    def __init__(self, registry: Any, bus: Any, links: LinkPool) -> None:
        self.registry = registry
        self.bus = bus
        self.links = links
        self._group: list[tuple[bytes, bytes]] = []
        self._offline: list[tuple[bytes, bytes]] = []
        self._pushes: dict[str, list[Any]] = defaultdict(list)
        self._flushing: asyncio.Task[None] | None = None
        self.routed = {"online": 0, "offline": 0, "group": 0}
        self.route_failures = 0

    def routed_all(self) -> asyncio.Future[None]:
        """Done once everything routed so far has been pushed or published (or failed)."""
        task = self._flushing
        if task is None or task.done():
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        return task

    def _schedule(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    def deliver(self, users: Iterable[str], message: StoredMessage,
                skip: tuple[str, str] | None) -> None:
        entry = entry_to_wire(message)
        if message.conv.startswith("g:") and self.bus is not None:
            record = orjson.dumps({"e": entry, "u": list(users), "s": skip})
            self._group.append((message.conv.encode(), record))
            self.routed["group"] += 1
        else:
            by_gateway: dict[str, list[str]] = defaultdict(list)
            for user in users:
                devices = self.registry.cached_lookup(user)
                if not devices:
                    self.routed["offline"] += 1
                    if self.bus is None:
                        continue  # embedded: the store already holds it for the next sync
                    log.info("user not found in registry user_id=%s conv=%s seq=%s: offline",
                             user, message.conv, message.seq)
                    self._offline.append((user.encode(), orjson.dumps(
                        [user, message.conv, message.seq, message.msg_id])))
                    continue
                for gateway in set(devices.values()):
                    by_gateway[gateway].append(user)
            for gateway, gw_users in by_gateway.items():
                self._pushes[gateway].append(["deliver", {"e": entry, "u": gw_users, "s": skip}])
                self.routed["online"] += 1
        self._schedule()

    def event(self, users: Iterable[str], payload: dict[str, Any],
              skip: tuple[str, str] | None) -> None:
        by_gateway: dict[str, list[str]] = defaultdict(list)
        for user in users:
            for gateway in set(self.registry.cached_lookup(user).values()):
                by_gateway[gateway].append(user)
        for gateway, gw_users in by_gateway.items():
            self._pushes[gateway].append(["event", {"p": payload, "u": gw_users, "s": skip}])
        if by_gateway:
            self._schedule()

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # gather everything routed in this loop iteration
        while self._group or self._offline or self._pushes:
            pushes, self._pushes = self._pushes, defaultdict(list)
            # Concurrently: one unreachable gateway must not delay the healthy ones.
            results = await asyncio.gather(*(self.links.push(gateway, "batch", items)
                                             for gateway, items in pushes.items()))
            for (gateway, items), ok in zip(pushes.items(), results):
                if not ok:
                    self.route_failures += 1
                    log.warning("route failed: gateway %s unreachable (%d pushes); clients "
                                "will sync", gateway, len(items))
            for topic, attr in ((TOPIC_GROUP, "_group"), (TOPIC_OFFLINE, "_offline")):
                items = getattr(self, attr)
                if not items:
                    continue
                setattr(self, attr, [])
                try:
                    await self.bus.publish_many(topic, items)
                except Exception as exc:  # noqa: BLE001 - entries are durable; sync recovers
                    self.route_failures += 1
                    log.error("route failed: publish to %s failed (%d records): %s",
                              topic, len(items), exc)
