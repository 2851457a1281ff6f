"""Link servers and reconnecting clients.

* :class:`LinkServer` listens (im-service on 9094, gateways on 9093) and
  serves calls and pushes from any number of peers.
  Either on TCP or, for the processes of one machine, on a Unix domain socket.
* :class:`LinkClient` keeps one connection to one peer, reconnecting with
  backoff; :meth:`LinkClient.call` waits (up to its timeout) for a
  connection instead of failing at once, so a restarting im-service costs
  latency, not errors.
* :class:`LinkPool` holds one client per peer address (pushes to gateways),
  created on first use.  :meth:`LinkPool.push_soon` never waits: a peer
  not connected gets its pushes queued, in order, while one task connects
  to it (up to the pool's timeout), so an unreachable gateway holds up
  nobody else's pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

from imfast.link.wire import Handler, LinkProtocol, PushHandler
from imfast.protocol.codes import ImfastError

__all__ = ["UNIX_PREFIX", "LinkClient", "LinkPool", "LinkServer", "split_addr"]

log = logging.getLogger("imfast.link")

#: An address ``unix:/path`` is a Unix domain socket: the processes of one
#: ``imfast serve --workers N`` talk over these, where a write costs about half
#: of a loopback TCP one (measured in docs/performance.md).
UNIX_PREFIX = "unix:"


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port)."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad address {addr!r}: expected host:port")
    return host.strip("[]"), int(port)


class LinkServer:
    """Accepts links; every connection shares ``handler`` and ``on_push``.

    ``on_broken(peer)`` is told when a connection that carried pushes to us
    closes without the peer's goodbye (it crashed, or the network reset it):
    pushes it had written may not have arrived.
    """

    def __init__(self, handler: Handler | None, on_push: PushHandler | None = None,
                 on_broken: Callable[[str], None] | None = None) -> None:
        self._handler = handler
        self._on_push = on_push
        self.on_broken = on_broken
        self._server: asyncio.Server | None = None
        self.connections: set[LinkProtocol] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on TCP ``host:port`` (0: any free port); the port listened on."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host, port, reuse_port=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        """Listen on the Unix domain socket ``path`` (a stale file there is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.get_running_loop().create_unix_server(self._factory, path)

    def _factory(self) -> LinkProtocol:
        proto = LinkProtocol(self._handler, self._on_push, self._lost)
        self.connections.add(proto)
        return proto

    def _lost(self, proto: LinkProtocol) -> None:
        self.connections.discard(proto)
        if proto.pushes_in and not proto.farewell and self.on_broken is not None:
            self.on_broken(proto.peer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.close()


class LinkClient:
    """One reconnecting link to ``addr``; see module docstring."""

    def __init__(self, addr: str, *, handler: Handler | None = None,
                 on_push: PushHandler | None = None, timeout: float = 10.0,
                 on_lost: Callable[[LinkProtocol], None] | None = None) -> None:
        self.addr = addr
        self._handler = handler
        self._on_push = on_push
        self._on_lost = on_lost
        self.timeout = timeout
        self._proto: LinkProtocol | None = None
        self._connecting: asyncio.Task[LinkProtocol] | None = None
        self._closed = False
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    @property
    def protocol(self) -> LinkProtocol | None:
        """The current (or last) connection."""
        return self._proto

    async def _connect_loop(self) -> LinkProtocol:
        addr = self.addr
        loop = asyncio.get_running_loop()

        def factory() -> LinkProtocol:
            return LinkProtocol(self._handler, self._on_push, self._on_lost,
                                call_timeout=self.timeout, name=addr)

        delay = 0.05
        while not self._closed:
            try:
                if addr.startswith(UNIX_PREFIX):
                    _, proto = await loop.create_unix_connection(factory,
                                                                 addr[len(UNIX_PREFIX):])
                else:
                    _, proto = await loop.create_connection(factory, *split_addr(addr))
                self.connects += 1
                self._proto = proto
                return proto
            except OSError as exc:
                log.warning("link to %s failed (%s); retrying in %.2fs", self.addr, exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
        raise ImfastError("link closed", code="unavailable")

    async def connection(self) -> LinkProtocol:
        """The live connection, connecting (with retries, up to ``timeout``) if needed."""
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect_loop())
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), self.timeout)
        except TimeoutError:
            raise ImfastError(f"{self.addr} unreachable; retry", code="unavailable") from None

    def call(self, method: str, args: Any) -> asyncio.Future[Any]:
        """A request/response round trip: a future of its result (see LinkProtocol.call).

        Queued now when connected, so calls keep their order; otherwise after
        connecting (up to ``timeout``).  Unanswered after ``timeout``: fails with
        ``unavailable`` (the far side is overloaded or stuck; the caller may retry).
        """
        proto = self._proto
        if proto is not None and not proto.closed:
            return proto.call(method, args)
        return asyncio.ensure_future(self._call_after_connecting(method, args))

    def call_with(self, method: str, args: Any, answer: Any) -> None:
        """:meth:`call` with an answer callback (see LinkProtocol.call_with): queued now
        when connected, so calls keep their order; otherwise after connecting."""
        proto = self._proto
        if proto is not None and not proto.closed:
            proto.call_with(method, args, answer)
            return

        def settled(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                answer(None, ImfastError("internal link closed; retry", code="unavailable"))
            elif f.exception() is not None:
                answer(None, f.exception())
            else:
                answer(f.result(), None)

        self.call(method, args).add_done_callback(settled)

    async def _call_after_connecting(self, method: str, args: Any) -> Any:
        proto = await self.connection()
        return await proto.call(method, args)

    def cast(self, method: str, args: Any) -> bool:
        """Send a cast (see imfast.link.wire) if connected; False if not (then call instead)."""
        proto = self._proto
        if proto is not None and not proto.closed:
            proto.cast(method, args)
            return True
        return False

    def push(self, method: str, args: Any) -> bool:
        """Send a one-way message if connected; False (and a reconnect) if not."""
        proto = self._proto
        if proto is not None and not proto.closed:
            proto.push(method, args)
            return True
        if not self._closed and (self._connecting is None or self._connecting.done()):
            self._connecting = asyncio.get_running_loop().create_task(self._connect_loop())
        return False

    def stop(self) -> None:
        """Stop for good: no more connect attempts, the connection (if any) closed."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._proto is not None:
            self._proto.close()

    async def close(self) -> None:
        self.stop()


Dropped = Callable[[str, list[tuple[str, Any]]], None]
#: ``(method, args)`` of a push -> the users it was meant for (those a RESYNC names).
UsersOf = Callable[[str, Any], Iterable[str]]

#: The push that tells a peer some pushes meant for it were dropped, with the users
#: they were for (None: not known, or too many): the first push it gets from us
#: after such a loss, sent as soon as it is reachable again.
RESYNC = "resync"
#: A RESYNC names at most this many users; beyond, it names none (every session
#: there then checks the store at its next entry per conversation), so what a
#: lost peer costs us here stays bounded.
RESYNC_USERS_MAX = 10_000
#: How long a peer that lost pushes is tried, so that it gets its RESYNC without
#: waiting for a later push; after that it is forgotten (its link closed: no more
#: connect attempts), and a later push to it still starts with a RESYNC naming none.
RESYNC_PATIENCE = 300.0
#: Given-up peers whose RESYNC (naming none) is kept for their return, at most: beyond,
#: the oldest is forgotten, so replaced pods (each under a new address) cost no memory
#: for ever.  One that does come back after that is not told; its sessions still catch
#: up at the next entry of a conversation with a gap, or when they resume.
GIVEN_UP_PEERS_MAX = 1_000


class _Losses:
    """What a peer lost: pushes for ``users``, and (``anyone``) pushes for users not known."""

    __slots__ = ("anyone", "users")

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.anyone = False

    def add(self, users: Iterable[str] | None) -> None:
        if users is None:
            self.anyone = True
            return
        self.users.update(users)
        if len(self.users) > RESYNC_USERS_MAX:  # bounded: beyond, name nobody
            self.users = set()
            self.anyone = True


class LinkPool:
    """One :class:`LinkClient` per peer address, created on demand.

    ``on_dropped(address, pushes)`` is told of the ``(method, args)`` pushes
    :meth:`push_soon` gave up on: the peer stayed unreachable for ``timeout`` seconds, or the
    connection closed before they could be written.  The peer itself gets
    :data:`RESYNC`, naming the users ``users_of`` finds in those pushes, as soon as
    it is reachable again (tried for ``patience`` seconds) and in any case before
    the next push that reaches it.
    """

    def __init__(self, timeout: float = 5.0, on_dropped: Dropped | None = None,
                 users_of: UsersOf | None = None, patience: float = RESYNC_PATIENCE) -> None:
        self._clients: dict[str, LinkClient] = {}
        self._timeout = timeout
        self.on_dropped = on_dropped
        self.users_of = users_of
        self._patience = patience
        #: address -> pushes waiting for the connection being made to it (in order).
        self._backlog: dict[str, list[tuple[str, Any]]] = {}
        #: address -> the task connecting to it and then writing its backlog.
        self._writers: dict[str, asyncio.Task[None]] = {}
        #: Peers that lost pushes and have not been sent RESYNC yet -> what they lost.
        self._lost: dict[str, _Losses] = {}
        #: address -> the connection that carried its last named RESYNC and the names:
        #: put back if that connection breaks (the RESYNC may not have arrived).
        self._resync_carried: dict[str, tuple[LinkProtocol | None, set[str]]] = {}
        #: address -> the task waiting for it to be reachable to send its RESYNC.
        self._resyncers: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        #: Peers given up (past ``patience``) whose RESYNC is still owed, oldest first.
        self._given_up: dict[str, None] = {}

    def get(self, addr: str) -> LinkClient:
        client = self._clients.get(addr)
        if client is None:
            client = self._clients[addr] = LinkClient(
                addr, timeout=self._timeout, on_lost=functools.partial(self._broken, addr))
        return client

    def _broken(self, addr: str, proto: LinkProtocol) -> None:
        """A connection to ``addr`` closed: if it carried pushes and neither end said
        goodbye, some may not have arrived; the peer is told (naming nobody, and again
        the users a RESYNC on that connection named)."""
        carried = self._resync_carried.get(addr)
        if carried is not None and carried[0] is proto:
            del self._resync_carried[addr]
        else:
            carried = None
        if proto.pushes_out and not proto.farewell and addr in self._clients:
            log.warning("link to %s broke after %d pushes; it will be told some may be lost",
                        addr, proto.pushes_out)
            self._note_lost(addr, None)
            if carried is not None:
                self._note_lost(addr, carried[1])
        client = self._clients.get(addr)
        if client is not None and client.protocol is proto:
            self._forget_if_idle(addr)

    def _forget_if_idle(self, addr: str) -> None:
        """Stop and drop ``addr``'s client when nothing is owed to it: no push waiting,
        no RESYNC to send.  A peer that went away (a gateway pod replaced under a new
        address) is then neither retried for ever nor remembered; a later push to it
        makes a new client and tries again for the pool's timeout."""
        if self._closing or addr in self._writers or addr in self._lost \
                or addr in self._resyncers:
            return
        client = self._clients.pop(addr, None)
        if client is not None:
            client.stop()

    def push_soon(self, addr: str, method: str, args: Any) -> asyncio.Task[None] | None:
        """Push now if connected (None); otherwise queue it behind the pushes already
        waiting for ``addr`` and return at once the task that writes them.

        Per peer, pushes are written in the order they were given.  Queued ones
        go as soon as a connection is made (one task per peer connects, up to the
        pool's timeout); if none is, they are dropped and ``on_dropped`` is told.
        The returned task ends when they were written or dropped: a caller that
        must not answer before its pushes left (im-service's ``sent``) waits for
        it, and nobody else does.
        """
        task = self._writers.get(addr)
        if task is not None:  # a connect is under way: join the queue, keep the order
            self._backlog[addr].append((method, args))
            return task
        client = self.get(addr)
        if self._told_of_losses(addr, client) and client.push(method, args):
            return None
        self._backlog[addr] = [(method, args)]
        task = self._writers[addr] = asyncio.get_running_loop().create_task(
            self._push_backlog(addr, client))
        return task

    def _told_of_losses(self, addr: str, client: LinkClient) -> bool:
        """True once ``addr`` has been told of every push it lost (RESYNC sent now
        if it is connected and was not yet)."""
        losses = self._lost.get(addr)
        if losses is None:
            return True
        if losses.users:
            if not client.push(RESYNC, sorted(losses.users)):
                return False
            carried = self._resync_carried.get(addr)
            names = losses.users if carried is None or carried[0] is not client.protocol \
                else carried[1] | losses.users
            self._resync_carried[addr] = (client.protocol, names)
            losses.users = set()
        if losses.anyone and not client.push(RESYNC, None):
            return False
        del self._lost[addr]
        self._given_up.pop(addr, None)
        return True

    async def _push_backlog(self, addr: str, client: LinkClient) -> None:
        try:
            await client.connection()
        except ImfastError:
            pass  # unreachable for the whole timeout: what waited is dropped below
        finally:
            del self._writers[addr]
        backlog = self._backlog.pop(addr, [])
        unsent = backlog if not self._told_of_losses(addr, client) else [
            item for item in backlog if not client.push(*item)]
        if unsent:
            users_of = self.users_of
            users = None if users_of is None else [
                user for item in unsent for user in users_of(*item)]
            if users is None or users:  # droppable pushes only (events): nothing to tell
                self._note_lost(addr, users)
            if self.on_dropped is not None:
                self.on_dropped(addr, unsent)
        if not client.connected:
            self._forget_if_idle(addr)  # unreachable and owed nothing: stop trying

    def _note_lost(self, addr: str, users: Iterable[str] | None) -> None:
        """Remember that pushes for ``users`` (None: anyone) were lost on the way to
        ``addr``, and tell it as soon as it is reachable."""
        self._lost.setdefault(addr, _Losses()).add(users)
        self._given_up.pop(addr, None)  # tried again, for another ``patience``
        if addr not in self._resyncers:
            self._resyncers[addr] = asyncio.get_running_loop().create_task(
                self._resync_when_back(addr))

    async def _resync_when_back(self, addr: str) -> None:
        """Send ``addr`` its RESYNC as soon as it is reachable (within ``patience``);
        give it up after that: its link is closed and the pool forgets it, keeping
        only that it must be told (naming nobody) if it ever gets a push again."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._patience
        try:
            while addr in self._lost:
                client = self.get(addr)
                try:
                    await asyncio.wait_for(client.connection(),
                                           max(0.0, give_up_at - loop.time()))
                except (ImfastError, TimeoutError):
                    if loop.time() < give_up_at:
                        continue
                    if addr not in self._writers:  # nobody is waiting on its link
                        self._lost[addr] = forgotten = _Losses()  # names: memory bound
                        forgotten.anyone = True
                        self._given_up[addr] = None
                        while len(self._given_up) > GIVEN_UP_PEERS_MAX:
                            oldest = next(iter(self._given_up))
                            del self._given_up[oldest]
                            del self._lost[oldest]
                        self._clients.pop(addr, None)
                        await client.close()
                        log.warning("link to %s given up after %.0fs unreachable; "
                                    "it will be told of its lost pushes if it returns",
                                    addr, self._patience)
                    return
                if not self._told_of_losses(addr, client):
                    await asyncio.sleep(0.05)  # closed again at once: try once more
        finally:
            del self._resyncers[addr]

    @property
    def queued(self) -> int:
        """Pushes waiting for a connection now."""
        return sum(len(b) for b in self._backlog.values())

    async def close(self) -> None:
        self._closing = True
        for task in [*self._writers.values(), *self._resyncers.values()]:
            task.cancel()
        for addr in list(self._lost):  # a last chance to tell the ones connected now
            client = self._clients.get(addr)
            if client is not None:
                self._told_of_losses(addr, client)
        for c in self._clients.values():
            await c.close()
        self._clients.clear()
