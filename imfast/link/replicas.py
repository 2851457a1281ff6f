"""Links to every im-service replica, and the choice of one per conversation.

A gateway sends a conversation's new entries through one replica, picked
by a hash of the conversation id, so one router numbers, stores and routes
them and its pushes leave in seq order (``Router.submit_entry``).  Through
several replicas, two entries of one conversation could be committed and
pushed in either order, and a gateway drops an entry that arrives after a
higher seq of its conversation.

``SERVICE_ADDR`` is ``host:port`` or a comma list of them; every address a
host name resolves to is one replica (in Kubernetes: ``im-service`` is a
headless Service, so its name resolves to every ready pod).  The names are
resolved again every ``refresh`` seconds; the replicas are kept sorted, so
every gateway that sees the same set picks the same replica for a
conversation.  While the set changes (a rollout, a scale), two gateways can
briefly disagree, and two replicas may push one conversation's entries out of
order.  A session that pushed in the conversation finds the gap against what it
pushed; for the others, ``on_change`` (the gateway's ``replicas_changed``) has
every session connected until a resolution interval after the change check its
next first push per conversation against the store.  A change another gateway
saw first leaves the entries it misordered before this one resolves unchecked
(up to ``refresh`` seconds: a known limit, docs/reliability.md).

Calls that create no entry (acks, sync, ...) go to any replica: the first
connected one from a rotating start.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import zlib
from typing import Any

from imfast.link.endpoints import LinkClient, split_addr

__all__ = ["ServiceLinks", "replica_index"]

log = logging.getLogger("imfast.link")


def replica_index(key: str, replicas: int) -> int:
    """The replica (0..replicas-1) for ``key``; the same in every process."""
    return zlib.crc32(key.encode()) % replicas


class ServiceLinks:
    """One :class:`LinkClient` per im-service replica; see module docstring."""

    def __init__(self, addrs: str, *, refresh: float = 10.0,
                 resolve: Any = None, **client_kwargs: Any) -> None:
        self.spec = [a.strip() for a in addrs.split(",") if a.strip()]
        if not self.spec:
            raise ValueError("SERVICE_ADDR names no address")
        self.refresh = refresh
        self._resolve = resolve or _resolve_all
        self._kwargs = client_kwargs
        # Until the first resolution: the addresses as given (one link each).
        self.clients: dict[str, LinkClient] = {a: LinkClient(a, **client_kwargs)
                                               for a in self.spec}
        self.order: list[str] = sorted(self.clients)
        self._next = 0
        #: Called when the replica set changed (not for the first resolution).
        self.on_change: Any = None
        self._resolved = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------ choosing
    def for_key(self, key: str) -> LinkClient:
        """The replica that handles ``key``'s (a conversation id's) new entries."""
        order = self.order
        return self.clients[order[replica_index(key, len(order))]]

    def any(self) -> LinkClient:
        """A connected replica if there is one (rotating), else the next one."""
        order = self.order
        for _ in range(len(order)):
            client = self.clients[order[self._next % len(order)]]
            self._next += 1
            if client.connected:
                return client
        return self.clients[order[self._next % len(order)]]

    # -------------------------------------------- the LinkClient surface
    @property
    def connected(self) -> bool:
        return any(c.connected for c in self.clients.values())

    async def call(self, method: str, args: Any) -> Any:
        return await self.any().call(method, args)

    def call_with(self, method: str, args: Any, answer: Any) -> None:
        self.any().call_with(method, args, answer)

    def cast(self, method: str, args: Any) -> bool:
        return self.any().cast(method, args)

    def push(self, method: str, args: Any) -> None:
        for client in self.clients.values():
            client.push(method, args)
        self._start_refresh()

    # ------------------------------------------------------- resolution
    def _start_refresh(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while not self._closed:
            await self.resolve_now()
            await asyncio.sleep(self.refresh)

    async def resolve_now(self) -> None:
        """Resolve every name in ``SERVICE_ADDR`` and open/close links to match."""
        found: set[str] = set()
        for addr in self.spec:
            try:
                found.update(await self._resolve(addr))
            except OSError as exc:
                log.warning("cannot resolve im-service address %s (%s); keeping the replicas "
                            "known", addr, exc)
                return
        if not found or sorted(found) == self.order:
            self._resolved = self._resolved or bool(found)
            return
        for addr in sorted(found - set(self.clients)):
            self.clients[addr] = LinkClient(addr, **self._kwargs)
            self.clients[addr].push("noop", None)
        gone = [a for a in self.clients if a not in found]
        self.order = sorted(found)
        log.info("im-service replicas: %s", ", ".join(self.order))
        if self._resolved and self.on_change is not None:
            self.on_change()
        self._resolved = True
        for addr in gone:
            client = self.clients.pop(addr)
            await client.close()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for client in list(self.clients.values()):
            await client.close()


async def _resolve_all(addr: str) -> list[str]:
    """``host:port`` -> every ``ip:port`` the host resolves to (IPv4 and IPv6)."""
    host, port = split_addr(addr)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        out.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return out
