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
  droppable, so an unreachable gateway just misses them;
* no round waits for a gateway: one not connected gets its pushes in order
  once its link is up, or they are dropped after the link pool's timeout
  (5 s) and counted in ``route_failures``; the other gateways get theirs at
  once.  A gateway that lost pushes is told whose (``resync``,
  :func:`users_in_batch`) as soon as it is reachable again, and those users'
  sessions there read what they missed from the store.  Senders
  (``routed_all``) are answered once their round's pushes were written or
  given up: an acknowledged message never waits in this
  process's memory only, so a crash before a push left means no ``sent``
  and a resend, which routes it again.

Nothing here can lose an acknowledged message: entries are durable before
they get here, and a client that missed a push gets the entry by sync or
resume (its session detects the gap at the next entry).

Kafka records are not dropped when the broker is down: a publish that fails
puts its records in a spool (in memory, per topic, up to ``SPOOL_MAX``), and
a background task publishes the spool, oldest first, until the broker takes
it.  While a topic's spool is not empty, new records for it join the end of
the spool without a publish attempt, so per-key order is kept and senders
are not held up by a broker that is known to be down.  The spool does not
survive an im-service crash; the entries themselves are in the store, so
online members still get them at their next entry or reconnect.
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

__all__ = ["TOPIC_GROUP", "TOPIC_OFFLINE", "ClusterPusher"]

log = logging.getLogger("imfast.service")

TOPIC_GROUP = "group_msg"
TOPIC_OFFLINE = "offline_msg"
#: Records held per topic while Kafka is down; beyond it the oldest are dropped (logged).
SPOOL_MAX = 100_000
SPOOL_RETRY = 0.25  # first wait between attempts to publish the spool; doubles up to 5 s
SPOOL_RETRY_MAX = 5.0
SPOOL_BATCH = 500


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)


def _wake_after(waiters: list[asyncio.Future[None]], pending: list[asyncio.Task[None]]) -> None:
    """Wake ``waiters`` once every task in ``pending`` is done (now, if none is pending):
    a round's senders wait for their pushes to a connecting gateway (written or given
    up), while the next rounds go on."""
    if not pending:
        _wake(waiters)
        return
    asyncio.gather(*pending, return_exceptions=True).add_done_callback(
        lambda _: _wake(waiters))


def users_in_batch(method: str, items: Any) -> list[str]:
    """The users whose entries a ``batch`` push carried (what a lost one makes a
    gateway check).  Events are left out: they are droppable."""
    if method != "batch":
        return []
    return [user for kind, data in items if kind == "deliver" for user in data["u"]]


class ClusterPusher:
    """Implements the router's Pusher for a cluster; see module docstring."""

    def __init__(self, registry: Any, bus: Any, links: LinkPool) -> None:
        self.registry = registry
        self.bus = bus
        self.links = links
        links.on_dropped = self._push_dropped
        links.users_of = users_in_batch
        self._group: list[tuple[bytes, bytes]] = []
        self._offline: list[tuple[bytes, bytes]] = []
        self._pushes: dict[str, list[Any]] = defaultdict(list)
        self._private: list[tuple[list[str], StoredMessage, list[Any], Any]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._now_scheduled = False  # a _flush_now is queued (see _schedule)
        #: routed_all() callers waiting for the next flush round to finish.
        self._waiters: list[asyncio.Future[None]] = []
        self._spool: dict[str, list[tuple[bytes, bytes]]] = {TOPIC_GROUP: [], TOPIC_OFFLINE: []}
        self._spooling: asyncio.Task[None] | None = None
        self.routed = {"online": 0, "offline": 0, "group": 0}
        self.route_failures = 0
        #: Records that went through the spool / were dropped from a full spool.
        self.spooled_total = 0
        self.spool_dropped = 0

    @property
    def spooled(self) -> int:
        """Records waiting in the spool now (Kafka was down)."""
        return sum(len(v) for v in self._spool.values())

    async def before_resume(self, user: str) -> None:
        """Make this process's registry cache know ``user``'s devices as etcd does now.

        The router calls it before reading a resume plan: the device registered
        before asking, and the watch may not have told this process yet; an
        entry routed in that window would go to ``offline_msg`` and reach the
        online device only at its next entry in that conversation.
        """
        refresh = getattr(self.registry, "refresh", None)
        if refresh is not None:
            await refresh(user)

    def routed_all(self) -> asyncio.Future[None]:
        """Done once everything routed so far has been pushed or published (or failed).

        It waits for the flush round that takes what is queued now, not for the
        flush task: under steady load that task never runs dry, and a sender's
        ``sent`` must not wait for entries routed after its own.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = self._flushing
        if not self._now_scheduled and (task is None or task.done()):
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    def _take_waiters(self) -> list[asyncio.Future[None]]:
        waiters, self._waiters = self._waiters, []
        return waiters

    def _schedule(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            return  # the round under way takes it
        if self.bus is None:
            # Embedded (`imfast serve --workers N`): nothing to look up or publish, and
            # the workers' links are up: the round runs as one plain callback at the
            # end of this loop iteration - no task, no extra iterations before the
            # pushes leave and the senders are answered.
            if not self._now_scheduled:
                self._now_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_now)
            return
        self._flushing = asyncio.get_running_loop().create_task(self._flush())

    def _flush_now(self) -> None:
        """One round without awaiting (no bus)."""
        self._now_scheduled = False
        waiters = self._take_waiters()
        private, self._private = self._private, []
        self._route_looked_up(private)
        _wake_after(waiters, self._push_all())

    def _push_all(self) -> list[asyncio.Task[None]]:
        """Hand every queued push to its gateway's link, without waiting: a gateway
        not connected gets its pushes when it is (in order), or they are dropped
        (:meth:`_push_dropped`) after the pool's timeout; the others go now.
        Returns the tasks writing the pushes that wait for a connection."""
        pushes, self._pushes = self._pushes, defaultdict(list)
        pending = []
        for gateway, items in pushes.items():
            writer = self.links.push_soon(gateway, "batch", items)
            if writer is not None:
                pending.append(writer)
        return pending

    def _push_dropped(self, gateway: str, pushes: list[tuple[str, Any]]) -> None:
        self.route_failures += 1
        log.warning("route failed: gateway %s unreachable (%d pushes); clients will sync",
                    gateway, sum(len(items) for _, items in pushes))

    def deliver(self, users: Iterable[str], message: StoredMessage,
                skip: tuple[str, str] | None) -> None:
        entry = entry_to_wire(message)
        if message.conv.startswith("g:") and self.bus is not None:
            record = orjson.dumps({"e": entry, "u": list(users), "s": skip})
            self._group.append((message.conv.encode(), record))
            self.routed["group"] += 1
        else:
            # Looked up at flush time, in routing order (see _route_private).
            self._private.append((list(users), message, entry, skip))
        self._schedule()

    async def _route_private(self) -> None:
        """Turn the queued private deliveries into pushes and offline records, in order.

        A user the registry cache does not know is read from etcd first
        (``registry.refresh``): the watch may lag a registration made on
        another replica's behalf (a device's resume plan may have been read
        by another im-service, which refreshed only its own cache), and an
        entry routed as offline would reach the online device only at its next
        entry, sync or resume.  The flush waits for those reads, so pushes
        keep their routing order.
        """
        private, self._private = self._private, []
        refresh = getattr(self.registry, "refresh", None)
        if refresh is not None and self.bus is not None:
            unknown = {u for users, _, _, _ in private for u in users
                       if not self.registry.cached_lookup(u)}
            if unknown:
                await asyncio.gather(*(refresh(u) for u in sorted(unknown)),
                                     return_exceptions=True)
        self._route_looked_up(private)

    def _route_looked_up(self, private: list[tuple[list[str], StoredMessage, list[Any], Any]]
                         ) -> None:
        """Queue pushes (or offline records) for ``private``, by the registry cache."""
        for users, message, entry, skip in private:
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
        try:
            await asyncio.sleep(0)  # gather everything routed in this loop iteration
            while self._group or self._offline or self._pushes or self._private:
                # Whoever waits now waits for what is queued now: this round.
                waiters = self._take_waiters()
                pending: list[asyncio.Task[None]] = []
                try:
                    pending = await self._flush_round()
                finally:
                    _wake_after(waiters, pending)
        finally:
            _wake(self._take_waiters())  # nothing left queued: every waiter's entries went

    async def _flush_round(self) -> list[asyncio.Task[None]]:
        """Push and publish everything queued when it starts (one round); returns the
        tasks writing its pushes to gateways still connecting."""
        if self._private:
            await self._route_private()
        pending = self._push_all()
        for topic, attr in ((TOPIC_GROUP, "_group"), (TOPIC_OFFLINE, "_offline")):
            items = getattr(self, attr)
            if not items:
                continue
            setattr(self, attr, [])
            if self._spool[topic]:  # the broker is known to be down: keep the order
                self._to_spool(topic, items)
                continue
            try:
                await self.bus.publish_many(topic, items)
            except Exception as exc:  # noqa: BLE001 - spooled, published when it is back
                self.route_failures += 1
                log.error("route failed: publish to %s failed (%d records): %s; spooling "
                          "until Kafka is back", topic, len(items), exc)
                self._to_spool(topic, items)
        return pending

    def _to_spool(self, topic: str, items: list[tuple[bytes, bytes]]) -> None:
        spool = self._spool[topic]
        spool.extend(items)
        self.spooled_total += len(items)
        if len(spool) > SPOOL_MAX:
            dropped = len(spool) - SPOOL_MAX
            del spool[:dropped]
            self.spool_dropped += dropped
            log.error("route failed: Kafka spool for %s full, dropped the %d oldest records; "
                      "clients will sync", topic, dropped)
        if self._spooling is None or self._spooling.done():
            self._spooling = asyncio.get_running_loop().create_task(self._drain_spool())

    async def _drain_spool(self) -> None:
        """Publish spooled records, oldest first, until every spool is empty."""
        delay = SPOOL_RETRY
        published = 0
        while any(self._spool.values()):
            progress = False
            for topic, spool in self._spool.items():
                while spool:
                    items = spool[:SPOOL_BATCH]
                    try:
                        await self.bus.publish_many(topic, items)
                    except Exception as exc:  # noqa: BLE001 - still down: wait, try again
                        log.warning("Kafka still unavailable (%d records spooled): %s",
                                    self.spooled, exc)
                        break
                    del spool[:len(items)]  # only what was published; more may have joined
                    published += len(items)
                    progress = True
            if any(self._spool.values()):
                delay = SPOOL_RETRY if progress else min(delay * 2, SPOOL_RETRY_MAX)
                await asyncio.sleep(delay)
        log.info("Kafka is back: published %d spooled records", published)
