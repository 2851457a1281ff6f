"""``imfast gateway``: a gateway process of a distributed deployment.

It holds client sockets like the embedded node but asks im-service (9094)
for every state change, registers each connected device in etcd
(``/registry/users/<user>/<device>`` -> this gateway's push address, under
this process's lease), receives pushes on 9093, and consumes ``group_msg``
in consumer group ``gateway-group`` to fan group entries out.

Guarantees on top of :class:`~imfast.gateway.server.Gateway`'s:

* a session's resume starts only after its registration is written, so any
  entry committed later is routed to this gateway (or found by the resume);
  a second check a little later closes the window of the service's registry
  cache lagging etcd;
* a ``group_msg`` offset is committed only after its fan-out was handed on:
  local sessions offered, other gateways pushed, and members with no
  device sent to ``offline_msg``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import defaultdict
from typing import Any

import orjson

from imfast.auth import TokenVerifier
from imfast.backends.metrics import BackendCollector
from imfast.config import Settings
from imfast.gateway.server import Gateway
from imfast.gateway.session import PUSH_EPOCH_UNTIL_RECHECK, Session
from imfast.link.endpoints import LinkClient, LinkPool, LinkServer
from imfast.link.replicas import ServiceLinks
from imfast.protocol.codes import ImfastError
from imfast.service.pusher import TOPIC_GROUP, TOPIC_OFFLINE, users_in_batch
from imfast.service.remote import RemoteRouter, entry_from_wire

__all__ = ["GROUP_GATEWAYS", "ClusterGateway", "GatewayNode"]

log = logging.getLogger("imfast.gateway")

GROUP_GATEWAYS = "gateway-group"
RECHECK_DELAY = 2.0


class ClusterGateway(Gateway):
    """A Gateway whose sessions are registered in etcd and routed by im-service."""

    def __init__(self, settings: Settings, verifier: TokenVerifier, router: Any,
                 registry: Any, advertise: str) -> None:
        super().__init__(settings, verifier, router, role="gateway")
        self.registry = registry
        self.advertise = advertise
        self._registrations: dict[tuple[str, str], asyncio.Future[None]] = {}

    def on_session_bound(self, session: Session) -> None:
        super().on_session_bound(session)
        key = (session.user, session.device)
        task = self.loop.create_task(self.registry.register(session.user, session.device,
                                                            self.advertise))
        self._registrations[key] = task
        task.add_done_callback(functools.partial(self._registered, key))

    def _registered(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        # A registration that succeeded needs no keeping (before_resume only waits for one
        # under way, or warns about one that failed): each finished task held per idle
        # connection cost ~0.5 KB.  Retrieving the exception keeps asyncio from reporting it.
        if task.cancelled() or task.exception() is not None:
            return
        if self._registrations.get(key) is task:
            del self._registrations[key]

    def on_session_closed(self, session: Session) -> None:
        super().on_session_closed(session)
        current = self.table.session_of(session.user, session.device)
        if current is not None and current is not session:
            return  # the device reconnected here: its registration stands
        self._registrations.pop((session.user, session.device), None)
        task = self.loop.create_task(self.registry.unregister(session.user, session.device,
                                                              self.advertise))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def before_resume(self, session: Session) -> None:
        pending = self._registrations.get((session.user, session.device))
        if pending is not None:
            try:
                await asyncio.wait_for(asyncio.shield(pending), 5.0)
            except Exception:  # noqa: BLE001 - etcd down: resume anyway, sync heals
                log.warning("registration not confirmed user_id=%s device=%s",
                            session.user, session.device)
        if session.push_epoch == self.push_epoch:
            # Until the recheck, an entry may have been routed by a cache that did not
            # know us yet (to our old gateway, or offline): none is taken as the next
            # after the device's cursor without asking the store.
            session.push_epoch = PUSH_EPOCH_UNTIL_RECHECK
        self.loop.call_later(RECHECK_DELAY, session.recheck)

    def presence_of(self, users: list[str]) -> dict[str, dict[str, Any]]:
        result = super().presence_of(users)
        for user, state in result.items():
            if not state["online"] and self.registry.cached_lookup(user):
                state["online"] = True
                state["last_seen"] = None
        return result

    def push_link_broken(self, peer: str) -> None:
        """A link that pushed to us broke without a goodbye (its process crashed, or
        the network reset it): pushes it had written may be lost, for anyone here."""
        self.pushes_were_lost(None, f"the push link from {peer} broke")

    def on_push(self, method: str, items: Any) -> None:
        """Pushes from im-service or other gateways (port 9093), and im-service's
        reports of failed casts (on the link to it)."""
        if method == "cast_failed":
            cast, args, code, message, field = items
            session = self.table.session_of(args[0], args[1])
            if session is not None and cast != "own_ack":  # the client sent no own_ack
                session.cast_failed(cast, args, ImfastError(message, code=code, field=field))
            return
        if method == "resync":
            self.pushes_were_lost(items)
            return
        if method != "batch":
            log.warning("unknown push %s", method)
            return
        for kind, data in items:
            skip = tuple(data["s"]) if data.get("s") else None
            if kind == "deliver":
                self.deliver(data["u"], entry_from_wire(data["e"]), skip)
            elif kind == "event":
                self.event(data["u"], data["p"], skip)


class GatewayNode:
    """Wires a ClusterGateway to im-service, etcd and Kafka."""

    def __init__(self, settings: Settings) -> None:
        from imfast.service.node import require

        require(settings, "KAFKA_BROKERS", "ETCD_ENDPOINTS")
        self.settings = settings
        self.gateway: ClusterGateway | None = None
        self.port = 0
        self.push_port = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Any] = []

    async def start(self) -> int:
        from imfast.backends.etcd import EtcdRegistry
        from imfast.backends.kafka import KafkaBus

        s = self.settings
        verifier = TokenVerifier(s, embedded=False)
        self.links = LinkPool(on_dropped=self._fan_out_dropped, users_of=users_in_batch)
        self._closers.append(self.links)
        # The gateway is made below; pushes on these links (cast failures) reach it.
        service = ServiceLinks(s.service_addr, on_push=self._service_push)
        self._closers.append(service)
        await service.resolve_now()  # the replicas, before any client is served
        registry = EtcdRegistry(list(s.etcd_endpoints), owner=s.display_hostname)
        await registry.start()
        self._closers.append(registry)
        self.bus = KafkaBus(list(s.kafka_brokers), client_id=f"gateway-{s.display_hostname}",
                            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms)
        await self.bus.start()
        self._closers.append(self.bus)
        push_server = LinkServer(None, None)
        self.push_port = await push_server.start(s.host, s.push_port)
        self._closers.append(push_server)
        advertise = s.advertise_addr or f"127.0.0.1:{self.push_port}"
        from imfast.workers import WorkerGateway, report_loop

        self.gateway = WorkerGateway(s, verifier, RemoteRouter(service), registry, advertise)
        # Gateways pick a conversation's replica by a hash they may briefly disagree on
        # while the replica set changes: its entries can then overtake each other.
        gateway = self.gateway
        service.on_change = lambda: gateway.replicas_changed(service.refresh)
        push_server._on_push = self.gateway.on_push
        push_server.on_broken = self.gateway.push_link_broken
        self.gateway.extra_stats = lambda: {
            "service_link_connected": service.connected,
            "advertise_addr": advertise,
            "kafka_consumer_lag": sum(self.bus.consumer_lag().values()),
        }
        self.gateway.metrics_registry.register(BackendCollector([(self.bus, GROUP_GATEWAYS)]))
        self.port = await self.gateway.start()
        # Connect to im-service now (not at the first client) so /stats shows the link state.
        service.push("noop", None)
        self._tasks.append(asyncio.get_running_loop().create_task(
            self.bus.consume(TOPIC_GROUP, GROUP_GATEWAYS, self._fan_out_groups)))
        report_addr = os.environ.get("IMFAST_REPORT_ADDR")
        if report_addr:  # one of `imfast gateway --workers N`: report to the supervisor
            reporter = LinkClient(report_addr)
            self._closers.append(reporter)
            self._tasks.append(asyncio.get_running_loop().create_task(report_loop(
                self.gateway, reporter, f"gateway-{os.environ.get('IMFAST_WORKER_INDEX')}")))
        log.info("gateway started port=%s push=%s service=%s", self.port, advertise,
                 s.service_addr)
        return self.port

    def _service_push(self, method: str, args: Any) -> None:
        if self.gateway is not None:
            self.gateway.on_push(method, args)

    async def _fan_out_groups(self, batch: list[tuple[bytes, bytes]]) -> None:
        """Handle a batch of group_msg records (offsets are committed after this returns)."""
        gw = self.gateway
        assert gw is not None
        remote: dict[str, list[Any]] = defaultdict(list)
        offline: list[tuple[bytes, bytes]] = []
        for _key, value in batch:
            try:  # every field used below is checked here: a bad record is skipped whole
                record = orjson.loads(value)
                entry = entry_from_wire(record["e"])
                members = list(record["u"])
                if not all(isinstance(u, str) for u in members):
                    raise TypeError("member ids must be strings")
                skip = tuple(record["s"]) if record.get("s") else None
            except Exception:  # noqa: BLE001 - a bad record must not stall the partition
                log.error("skipping unreadable group_msg record (%d bytes)", len(value))
                continue
            local: list[str] = []
            by_gateway: dict[str, list[str]] = defaultdict(list)
            for user in members:
                devices = gw.registry.cached_lookup(user)
                if not devices:
                    offline.append((user.encode(), orjson.dumps(
                        [user, entry.conv, entry.seq, entry.msg_id])))
                    continue
                for address in set(devices.values()):
                    if address == gw.advertise:
                        local.append(user)
                    else:
                        by_gateway[address].append(user)
            if gw.table.users:
                # Also anyone connected here whose registration is still in flight.
                local = list(dict.fromkeys(local + [u for u in members
                                                    if gw.table.sessions_of(u)]))
            gw.deliver(local, entry, skip)
            for address, users in by_gateway.items():
                remote[address].append(["deliver", {"e": record["e"], "u": users,
                                                    "s": record.get("s")}])
        # A gateway not connected must not hold up the others: they get theirs now.  The
        # batch is done (and its offsets committed) once the pushes to connecting
        # gateways were written too, or given up on (_fan_out_dropped).
        pending = [w for address, items in remote.items()
                   if (w := self.links.push_soon(address, "batch", items)) is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if offline:
            await self.bus.publish_many(TOPIC_OFFLINE, offline)

    def _fan_out_dropped(self, address: str, pushes: list[tuple[str, Any]]) -> None:
        """Group entries for members on ``address`` given up on (unreachable): counted as
        failed deliveries; the members get them at their next resume."""
        members = sum(len(item[1]["u"]) for _, items in pushes for item in items)
        if self.gateway is not None:
            self.gateway.stats.failed += members
        log.warning("route failed: gateway %s unreachable for group fan-out (%d "
                    "deliveries); members there will sync", address, members)

    async def drain(self, deadline: float = 30.0) -> None:
        if self.gateway is not None:
            await self.gateway.start_drain("shutdown", deadline)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.gateway is not None:
            await self.gateway.stop()
        for c in reversed(self._closers):
            try:
                await c.close()
            except Exception:
                log.exception("close failed")
