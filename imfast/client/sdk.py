"""An asyncio client for imfast protocol v1 (docs/protocol.md), on picows.

:class:`Client` keeps one WebSocket open and promises:

* **exactly-once sends**: :meth:`Client.send` gives each message a unique
  ``cmid`` and returns only when the server answered ``sent`` (the message is
  durably stored).  If the connection drops first, the same frame (same
  ``cmid``) is sent again after reconnecting, and the server's dedup turns a
  repeat into the original ``sent``; so a message is stored once however
  often the network fails.
* **exactly-once, in-order delivery to the application**: conversation
  entries (:class:`Message`, :class:`GroupEvent`, :class:`Recall`) reach you
  in ``seq`` order per conversation; an entry at or below the last seq seen
  in its conversation is dropped (the server re-sends what was not yet
  acknowledged when a connection ends).  Entries are acknowledged to the
  server after you processed them, cumulatively and coalesced (at most one
  ``ack`` per conversation every ``ack_interval`` seconds).  The last seq per
  conversation lives in a :class:`CursorStore` (memory by default, or a JSON
  file with :class:`JsonFileCursorStore`, which makes this hold across
  restarts of your process too).  Entries this very device sent are reported
  by :meth:`Client.send` and never again as events.
* **reconnects by itself**, with exponential backoff and jitter, on lost
  connections and on the *reconnect* close codes (1001, 1006, 1011-1014,
  4000-4499), resuming where the device left off.  It stops on *terminal*
  codes (4500-4999, 1002, 1007-1009, ...): :meth:`events` and
  :meth:`wait_closed` then raise :class:`ConnectionClosed` with the code and
  the server's reason, and pending calls fail with it.
* a ``ping`` every heartbeat/3 seconds keeps the connection alive; a
  connection silent for two of those periods is treated as lost.

Requests other than ``send`` carry an ``id`` and are matched to their reply
by it; they wait for a connection, and raise :class:`ConnectionLost` if it
drops before the reply (they are not retried: some are not idempotent).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Self
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from picows import WSCloseCode, WSError, WSInvalidStatusError, WSListener, WSMsgType, ws_connect

from imfast.client.errors import (
    ClientError,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ServerError,
)
from imfast.client.events import (
    Connected,
    Conversations,
    Disconnected,
    Entry,
    Event,
    Presence,
    Receipt,
    Sent,
    SyncPage,
    Typing,
    parse_entry,
)
from imfast.client.store import CursorStore, MemoryCursorStore
from imfast.protocol.codes import CloseCode, is_reconnect_code
from imfast.protocol.ids import group_conv, is_valid_id, parse_conv, private_conv

__all__ = ["Client", "EventCallback", "TokenProvider"]

log = logging.getLogger("imfast.client")

#: Returns a (fresh) token; called before every connection attempt.
TokenProvider = Callable[[], "str | Awaitable[str]"]
#: Receives every event, in order; may be a coroutine function.
EventCallback = Callable[[Event], "Any"]

DEFAULT_BACKOFF = (0.25, 10.0)  # first delay, largest delay (seconds)
DEFAULT_ACK_INTERVAL = 0.25
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_HEARTBEAT = 90.0  # until the server's welcome says otherwise
#: "Retry the same frame later" (``rate_limited``: a server may name the send it dropped).
SEND_RETRY_CODES = ("unavailable", "internal", "rate_limited")

_END = object()  # ends the event queue


class _Connection:
    """One WebSocket: its transport, how it ended, and the replies it is waiting for."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: Any = None
        self.close_code = 1006
        self.close_reason = "connection lost"
        self.auth_error = ""
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.resumed: asyncio.Future[int] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.last_rx = loop.time()
        self.requests: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def send(self, frame: dict[str, Any]) -> None:
        if self.transport is not None and not self.done.done() \
                and not self.transport.is_disconnected:
            self.transport.send(WSMsgType.TEXT, orjson.dumps(frame))


class _Listener(WSListener):
    """picows callbacks -> the client (frames) and the connection (close, disconnect)."""

    def __init__(self, client: Client, conn: _Connection) -> None:
        super().__init__()
        self.client = client
        self.conn = conn

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        conn = self.conn
        conn.last_rx = asyncio.get_running_loop().time()
        if frame.msg_type == WSMsgType.TEXT:
            try:
                obj = orjson.loads(frame.get_payload_as_bytes())
            except orjson.JSONDecodeError:
                log.warning("server sent a frame that is not JSON; ignored")
                return
            if isinstance(obj, dict):
                self.client._on_frame(conn, obj)
        elif frame.msg_type == WSMsgType.CLOSE:
            payload = frame.get_payload_as_bytes()
            conn.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            conn.close_reason = payload[2:].decode("utf-8", "replace") or conn.auth_error
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode(conn.close_code if len(payload) >= 2 else 1000))
            transport.disconnect()

    def on_ws_disconnected(self, transport: Any) -> None:
        self.client._on_disconnected(self.conn)


class Client:
    """A protocol v1 client; see the module docstring for what it guarantees.

    ``token`` (a JWT) or ``token_provider`` (called before every connection
    attempt, so a reconnect gets a fresh token) authenticates; with neither,
    ``dev_user`` connects as ``?user=NAME`` to a server started with
    ``--insecure-dev-auth``.  ``device`` is the device to connect as with
    ``dev_user``; with a token the token's device is used, and a different
    ``device`` here is an error.  ``on_event`` receives every event (then
    :meth:`events` is not available); without it, read :meth:`events`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        token_provider: TokenProvider | None = None,
        dev_user: str | None = None,
        device: str | None = None,
        store: CursorStore | None = None,
        on_event: EventCallback | None = None,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        ack_interval: float = DEFAULT_ACK_INTERVAL,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"url must be ws://HOST[:PORT]/ws or wss://..., not {url!r}")
        if token is not None and token_provider is not None:
            raise ValueError("pass token or token_provider, not both")
        if dev_user is not None:
            if not is_valid_id(dev_user):
                raise ValueError(f"dev_user {dev_user!r} is not a valid user id")
            query = {"user": dev_user, **({"device": device} if device else {})}
            url = urlunsplit(parts._replace(query=urlencode(query)))
        self.url = url
        self._token = token
        self._token_provider = token_provider
        self._want_device = device
        self._store = store if store is not None else MemoryCursorStore()
        self._on_event = on_event
        self._backoff = backoff
        self._ack_interval = ack_interval
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout

        self.user = ""
        self.device = ""
        self.server = ""
        self.heartbeat = DEFAULT_HEARTBEAT
        self.max_body_bytes = 0
        # conv -> last seq handed to the application / accepted into the queue.
        self._processed: dict[str, int] = self._store.load()
        self._received: dict[str, int] = dict(self._processed)
        self._acked: dict[str, int] = {}
        self._ack_due: set[str] = set()
        self._own: dict[str, set[int]] = {}  # conv -> seqs we sent, not yet processed past
        self._ack_timer: asyncio.TimerHandle | None = None
        self._cmid_prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)
        self._sends: dict[str, tuple[dict[str, Any], asyncio.Future[Sent]]] = {}
        self._syncs: dict[str, tuple[str, list[Entry]]] = {}
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._conn: _Connection | None = None
        self._online: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._retry_hint: float | None = None
        self._closing = False
        self._error: ConnectionClosed | None = None
        self._stopped: asyncio.Event | None = None
        self._connects = 0

    # ------------------------------------------------------------ lifecycle
    async def connect(self) -> Connected:
        """Connect, authenticate and resume; raises :class:`ConnectError` or
        :class:`ConnectionClosed` (terminal code) if this first attempt fails.

        When it returns, what the device missed is already queued as events;
        from then on the client reconnects by itself until :meth:`close`.
        """
        if self._online is not None:
            raise ClientError("connect() was already called")
        self._online = asyncio.Event()
        self._stopped = asyncio.Event()
        try:
            connected = await self._open()
        except ConnectionClosed as exc:
            self._stop(exc, emit=False)
            raise
        except (OSError, TimeoutError, WSError, ConnectionLost) as exc:
            self._stop(ConnectionClosed(1006, str(exc)), emit=False)
            raise ConnectError(f"cannot connect to {self.url}: {_describe(exc)}") from None
        self._tasks.append(asyncio.create_task(self._supervise(), name="imfast-client"))
        if self._on_event is not None:
            self._tasks.append(asyncio.create_task(self._dispatch(), name="imfast-events"))
        return connected

    async def close(self) -> None:
        """Acknowledge what was processed, close the connection (1000) and stop.

        Pending calls fail with :class:`ConnectionClosed`; :meth:`events` ends.
        """
        if self._closing:
            return
        self._closing = True
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn = self._conn
        if conn is not None and not conn.done.done():
            if self._flush_acks() and self.connected:
                # Frames are handled in order: the pong means the acks are stored
                # (the server stops reading once it sees our close frame).
                try:
                    await asyncio.wait_for(self._roundtrip(conn, {"type": "ping"}), 2.0)
                except (ClientError, TimeoutError):
                    pass
            conn.transport.send_close(WSCloseCode.OK, b"client closing")
            try:
                await asyncio.wait_for(asyncio.shield(conn.done), 2.0)
            except TimeoutError:
                conn.transport.disconnect(graceful=False)
        self._stop(ConnectionClosed(1000, "closed by the client"), emit=False, terminal=False)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_closed(self) -> None:
        """Return after :meth:`close`; raise :class:`ConnectionClosed` on a terminal close."""
        assert self._stopped is not None, "connect() first"
        await self._stopped.wait()
        if self._error is not None:
            raise self._error

    @property
    def connected(self) -> bool:
        """True while a connection is authenticated."""
        return self._online is not None and self._online.is_set()

    @property
    def last_seqs(self) -> dict[str, int]:
        """conv -> the last seq the application processed (a copy)."""
        return dict(self._processed)

    # -------------------------------------------------------------- events
    async def events(self) -> AsyncIterator[Event]:
        """Every event, in arrival order.  An entry counts as processed (and is
        acknowledged) once the loop moves past it.  Ends after :meth:`close`;
        raises :class:`ConnectionClosed` after a terminal close."""
        if self._on_event is not None:
            raise ClientError("events go to on_event; events() is not available")
        while True:
            item = await self._queue.get()
            if item is _END:
                self._queue.put_nowait(_END)  # for any other reader
                if self._error is not None:
                    raise self._error
                return
            if isinstance(item, _Own):
                self._processed_one(item)
                continue
            try:
                yield item
            finally:
                self._processed_one(item)

    async def _dispatch(self) -> None:
        assert self._on_event is not None
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Own):
                self._processed_one(item)
                continue
            try:
                result = self._on_event(item)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_event callback failed for %r", item)
            self._processed_one(item)

    def _emit(self, event: Any) -> None:
        self._queue.put_nowait(event)

    def _processed_one(self, item: Any) -> None:
        if isinstance(item, (Entry, _Own)):
            self._advance_processed(item.conv, item.seq)

    def _advance_processed(self, conv: str, seq: int) -> None:
        """The application is done with ``conv`` up to ``seq`` (and our own sends after it)."""
        own = self._own.get(conv)
        if own:
            while seq + 1 in own:
                seq += 1
            own.difference_update([s for s in own if s <= seq])
        if seq > self._processed.get(conv, 0):
            self._processed[conv] = seq
            self._ack_soon(conv)

    def _note_own(self, conv: str, seq: int) -> None:
        if seq > self._processed.get(conv, 0):
            self._own.setdefault(conv, set()).add(seq)
            self._skip_own_received(conv)
            self._advance_processed(conv, self._processed.get(conv, 0))

    def _skip_own_received(self, conv: str) -> None:
        own = self._own.get(conv)
        last = self._received.get(conv, 0)
        while own and last + 1 in own:
            last += 1
        self._received[conv] = last

    # ----------------------------------------------------------------- send
    async def send(self, body: str, *, to: str | None = None, group: str | None = None,
                   cmid: str | None = None) -> Sent:
        """Send ``body`` to user ``to`` or to ``group``; returns when it is stored.

        Survives reconnects (same cmid, deduplicated by the server); raises
        :class:`ServerError` if the server refuses it (``forbidden``,
        ``not_found``, ``too_large``...) and :class:`ConnectionClosed` if the
        client stops first.
        """
        if (to is None) == (group is None):
            raise ValueError("send needs exactly one of to= or group=")
        target = to if to is not None else group
        if not is_valid_id(target):
            raise ValueError(f"{target!r} is not a valid user or group id")
        if not isinstance(body, str):
            raise TypeError("body must be a str")
        if self.max_body_bytes and len(body.encode("utf-8", "surrogatepass")) > self.max_body_bytes:
            raise ServerError("too_large", f"body is over {self.max_body_bytes} bytes", "body")
        if self._error is not None or self._closing:
            raise self._error or ConnectionClosed(1000, "closed by the client")
        if cmid is None:
            cmid = f"{self._cmid_prefix}-{next(self._counter)}"
        frame: dict[str, Any] = {"type": "send", "cmid": cmid, "body": body}
        frame["to" if to is not None else "group"] = target
        future: asyncio.Future[Sent] = asyncio.get_running_loop().create_future()
        self._sends[cmid] = (frame, future)
        if self.connected and self._conn is not None:
            self._conn.send(frame)
        try:
            return await future
        finally:
            self._sends.pop(cmid, None)

    def _on_sent(self, frame: dict[str, Any]) -> None:
        pending = self._sends.get(frame.get("cmid", ""))
        sent = Sent(cmid=frame["cmid"], msg_id=frame["msg_id"], conv=frame["conv"],
                    seq=int(frame["seq"]), ts=int(frame["ts"]),
                    duplicate=bool(frame.get("duplicate", False)))
        # Our own entry: it will not be pushed to us, so count it as seen and processed
        # once everything before it is (then the ack covers it and no resume repeats it).
        self._note_own(sent.conv, sent.seq)
        if pending is not None and not pending[1].done():
            pending[1].set_result(sent)

    def _retry_send(self, cmid: str, delay: float) -> None:
        def again() -> None:
            pending = self._sends.get(cmid)
            if pending is not None and self.connected and self._conn is not None:
                self._conn.send(pending[0])
        asyncio.get_running_loop().call_later(delay, again)

    # ------------------------------------------------------------- requests
    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        if self._error is not None or self._closing:
            raise self._error or ConnectionClosed(1000, "closed by the client")
        assert self._online is not None, "connect() first"

        async def roundtrip() -> dict[str, Any]:
            assert self._online is not None
            while True:
                await self._online.wait()
                conn = self._conn
                if conn is not None and not conn.done.done():
                    return await self._roundtrip(conn, frame)
                await asyncio.sleep(0)

        stopped = asyncio.ensure_future(self._stopped_wait())
        work = asyncio.ensure_future(roundtrip())
        try:
            done, _ = await asyncio.wait({work, stopped}, timeout=self._request_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if work in done:
            return work.result()
        work.cancel()
        if stopped in done:
            raise self._error or ConnectionClosed(1000, "closed by the client")
        raise TimeoutError(f"no reply to {frame['type']} within {self._request_timeout} s")

    async def _roundtrip(self, conn: _Connection, frame: dict[str, Any]) -> dict[str, Any]:
        rid = frame.setdefault("id", f"r{next(self._counter)}")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        conn.requests[rid] = future
        try:
            conn.send(frame)
            return await future
        finally:
            conn.requests.pop(rid, None)

    async def _stopped_wait(self) -> None:
        assert self._stopped is not None
        await self._stopped.wait()

    async def refresh(self, token: str) -> float:
        """Replace the token on the open connection (same user and device) and for
        reconnects; returns its expiry (epoch s)."""
        reply = await self._request({"type": "refresh", "token": token})
        self._token = token
        return float(reply.get("expires_at") or 0)

    async def ping(self) -> None:
        """One application ping round trip."""
        await self._request({"type": "ping"})

    async def conversations(self) -> Conversations:
        """Every conversation of the user (latest seq) and this device's cursors."""
        reply = await self._request({"type": "sync"})
        return Conversations(latest=dict(reply.get("conversations") or {}),
                             cursors=dict(reply.get("cursors") or {}))

    async def sync(self, conv: str, after: int | None = None,
                   limit: int | None = None) -> SyncPage:
        """Entries of ``conv`` after ``after`` (default: this device's cursor), one page.

        Entries new to the client are also delivered as events, as usual.
        """
        _check_conv(conv)
        _check_seq(after=after, limit=limit)
        frame: dict[str, Any] = {"type": "sync", "conv": conv}
        if after is not None:
            frame["after"] = after
        if limit is not None:
            frame["limit"] = limit
        collected: list[Entry] = []
        key = f"s{next(self._counter)}"
        self._syncs[key] = (conv, collected)
        try:
            reply = await self._request(frame)
        finally:
            self._syncs.pop(key, None)
        start, last = int(reply["after"]), int(reply["last"])
        by_seq = {e.seq: e for e in collected if start < e.seq <= last}
        return SyncPage(conv=conv, after=start, last=last, more=bool(reply.get("more")),
                        entries=[by_seq[s] for s in sorted(by_seq)])

    async def history(self, conv: str, *, before: int | None = None, after: int | None = None,
                      limit: int | None = None) -> list[Entry]:
        """A page of stored entries, oldest first (the newest page by default).

        History is for display: it does not go through duplicate suppression
        and is not acknowledged.
        """
        _check_conv(conv)
        _check_seq(before=before, after=after, limit=limit)
        frame: dict[str, Any] = {"type": "history", "conv": conv}
        for name, value in (("before", before), ("after", after), ("limit", limit)):
            if value is not None:
                frame[name] = value
        reply = await self._request(frame)
        return [parse_entry({**m, "conv": m.get("conv", conv)}) for m in reply["messages"]]

    async def read(self, conv: str, seq: int) -> None:
        """Tell the other members you have read ``conv`` up to ``seq``."""
        _check_conv(conv)
        _check_seq(seq=seq)
        await self._request({"type": "read", "conv": conv, "seq": seq})

    async def typing(self, conv: str) -> None:
        """Tell the other members you are typing (droppable: skipped while offline)."""
        _check_conv(conv)
        if self.connected and self._conn is not None:
            self._conn.send({"type": "typing", "conv": conv})

    async def recall(self, conv: str, seq: int) -> int:
        """Recall your message ``seq``; returns the seq of the recall entry."""
        _check_conv(conv)
        _check_seq(seq=seq)
        reply = await self._request({"type": "recall", "conv": conv, "seq": seq})
        self._note_own(conv, int(reply["seq"]))
        return int(reply["seq"])

    async def presence(self, users: Iterable[str]) -> dict[str, Presence]:
        """Who of ``users`` is online now."""
        reply = await self._request({"type": "presence", "users": _check_id_list("users", users)})
        return {u: Presence(u, bool(p.get("online")), p.get("last_seen"))
                for u, p in reply["users"].items()}

    # ------------------------------------------------------------- groups
    async def group_create(self, group: str, members: Iterable[str] = (),
                           name: str | None = None, open: bool = True) -> dict[str, str]:
        """Create ``group`` (you are its owner) with ``members``; returns user -> role.

        ``open`` False: invite-only (``group_join`` is refused; invite members)."""
        frame: dict[str, Any] = {"type": "group_create", "group": _check_ids(group)[0],
                                 "members": _check_id_list("members", members)}
        if name:
            frame["name"] = name
        if not open:
            frame["open"] = False
        reply = await self._request(frame)
        if not open and reply.get("open") is not False:
            raise ServerError("unsupported", "the server ignored open=False (it predates "
                              "invite-only groups): the group was created open", "open")
        return dict(reply["members"])

    async def group_join(self, group: str) -> dict[str, str]:
        """Join an existing group; returns user -> role."""
        return dict((await self._request({"type": "group_join", "group": _check_ids(group)[0]}))["members"])

    async def group_leave(self, group: str) -> dict[str, str]:
        """Leave a group; returns the remaining user -> role."""
        return dict((await self._request({"type": "group_leave", "group": _check_ids(group)[0]}))["members"])

    async def group_invite(self, group: str, users: Iterable[str]) -> dict[str, str]:
        """Add ``users`` (owner/admin only)."""
        frame = {"type": "group_invite", "group": _check_ids(group)[0],
                 "users": _check_id_list("users", users)}
        return dict((await self._request(frame))["members"])

    async def group_remove(self, group: str, users: Iterable[str]) -> dict[str, str]:
        """Remove ``users`` (owner/admin only)."""
        frame = {"type": "group_remove", "group": _check_ids(group)[0],
                 "users": _check_id_list("users", users)}
        return dict((await self._request(frame))["members"])

    async def group_role(self, group: str, user: str, role: str) -> dict[str, str]:
        """Make ``user`` an ``admin`` or a ``member`` (owner only)."""
        _check_ids(group, user)
        if role not in ("admin", "member"):
            raise ValueError(f"role must be admin or member, not {role!r}")
        frame = {"type": "group_role", "group": group, "user": user, "role": role}
        return dict((await self._request(frame))["members"])

    async def group_members(self, group: str) -> dict[str, str]:
        """user -> role of a group you are a member of."""
        return dict((await self._request({"type": "group_members", "group": _check_ids(group)[0]}))["members"])

    async def groups(self) -> list[str]:
        """The groups you are a member of."""
        return list((await self._request({"type": "groups"}))["groups"])

    def conv_with(self, user: str) -> str:
        """The conversation id of the private chat with ``user``."""
        return private_conv(self.user, user)

    @staticmethod
    def group_conv(group: str) -> str:
        """The conversation id of ``group``."""
        return group_conv(group)

    # ----------------------------------------------------------------- acks
    def _ack_soon(self, conv: str) -> None:
        self._ack_due.add(conv)
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self._ack_interval, self._flush_acks)

    def _flush_acks(self) -> bool:
        """Send one cumulative ack per conversation that moved; save the store first.

        Returns True if an ack was sent."""
        self._ack_timer = None
        if not self._ack_due:
            return False
        try:
            self._store.save(self._processed)
        except OSError as exc:
            log.warning("cannot save the cursor store: %s", exc)
        sent = False
        conn = self._conn
        online = self.connected and conn is not None and not conn.done.done()
        for conv in sorted(self._ack_due):
            seq = self._processed.get(conv, 0)
            if online and seq > self._acked.get(conv, 0):
                assert conn is not None
                conn.send({"type": "ack", "conv": conv, "seq": seq})
                self._acked[conv] = seq
                sent = True
        if online:
            self._ack_due.clear()
        return sent

    # --------------------------------------------------------------- frames
    def _on_frame(self, conn: _Connection, frame: dict[str, Any]) -> None:
        ftype = frame.get("type")
        if ftype == "msg":
            self._on_entry(parse_entry(frame))
            return
        if ftype == "sent":
            self._on_sent(frame)
            return
        rid = frame.get("id")
        if ftype == "error":
            self._on_error(conn, frame)
            return
        if ftype == "welcome":
            if not conn.welcome.done():
                conn.welcome.set_result(frame)
            return
        if ftype == "resumed":
            if not conn.resumed.done():
                conn.resumed.set_result(int(frame.get("conversations", 0)))
            return
        if rid is not None and str(rid) in conn.requests:
            future = conn.requests[str(rid)]
            if not future.done():
                future.set_result(frame)
            return
        if ftype == "receipt":
            self._emit(Receipt(frame["conv"], frame["user"], int(frame["seq"])))
        elif ftype == "typing":
            self._emit(Typing(frame["conv"], frame["user"]))
        elif ftype == "presence":
            for user, p in (frame.get("users") or {}).items():
                self._emit(Presence(user, bool(p.get("online")), p.get("last_seen")))
        elif ftype == "reconnect":
            self._retry_hint = max(0.0, float(frame.get("retry_after_ms", 0)) / 1000)
        elif ftype not in ("pong", "acked"):
            log.debug("unhandled frame %s", ftype)

    def _on_entry(self, entry: Entry) -> None:
        conv, seq = entry.conv, entry.seq
        for sync_conv, collected in self._syncs.values():
            if sync_conv == conv:
                collected.append(entry)
        if seq <= self._received.get(conv, 0):
            self._ack_soon(conv)  # a repeat: the server's cursor is behind; move it on
            return
        self._received[conv] = seq
        self._skip_own_received(conv)
        if entry.sender == self.user and entry.sender_device == self.device:
            self._emit(_Own(conv, seq))  # our own send, back after a reconnect
        else:
            self._emit(entry)

    def _on_error(self, conn: _Connection, frame: dict[str, Any]) -> None:
        code = str(frame.get("code", "internal"))
        message = str(frame.get("message", ""))
        rid, cmid = frame.get("id"), frame.get("cmid")
        if code == "auth_failed" and not conn.welcome.done():
            conn.auth_error = message
            return
        if cmid is not None and cmid in self._sends:
            _frame, future = self._sends[cmid]
            if code in SEND_RETRY_CODES:
                self._retry_send(cmid, self._delay(1))
            elif not future.done():
                future.set_exception(ServerError(code, message, frame.get("field")))
            return
        if rid is not None and str(rid) in conn.requests:
            future2 = conn.requests[str(rid)]
            if not future2.done():
                future2.set_exception(ServerError(code, message, frame.get("field")))
            return
        if code == "rate_limited":
            # The server dropped one of our frames without saying which: send what
            # is still unanswered again later (safe for sends: deduplicated by cmid).
            for pending_cmid in list(self._sends):
                self._retry_send(pending_cmid, 1.0)
        log.warning("server error %s: %s", code, message)

    # ----------------------------------------------------------- connection
    async def _token_now(self) -> str | None:
        if self._token_provider is None:
            return self._token
        value = self._token_provider()
        if inspect.isawaitable(value):
            value = await value
        self._token = str(value)
        return self._token

    async def _open(self) -> Connected:
        """One connection attempt: connect, authenticate, resend, resume."""
        conn = _Connection(asyncio.get_running_loop())
        token = await self._token_now()
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn.transport, _ = await ws_connect(
                    lambda: _Listener(self, conn), self.url,
                    websocket_handshake_timeout=self._connect_timeout, enable_auto_pong=True)
                if token is not None:
                    conn.send({"type": "auth", "token": token})
                await _either(conn.welcome, conn.done)
            if not conn.welcome.done():
                self._raise_for_close(conn)
            self._welcomed(conn, conn.welcome.result())
            try:
                await asyncio.wait_for(_either(conn.resumed, conn.done),
                                       self._connect_timeout * 3)
            except TimeoutError:
                raise ConnectionLost("the server did not finish resuming in time") from None
            if not conn.resumed.done():
                raise ConnectionLost(f"connection closed while resuming ({conn.close_code})")
        except BaseException:
            if conn.transport is not None:
                conn.transport.disconnect(graceful=False)
            raise
        self._connects += 1
        connected = Connected(self.user, self.device, self.server, conn.resumed.result(),
                              reconnected=self._connects > 1)
        self._emit(connected)
        return connected

    def _welcomed(self, conn: _Connection, welcome: dict[str, Any]) -> None:
        """Authenticated: take the connection into use and send what is waiting."""
        if self._want_device and welcome.get("device") != self._want_device:
            raise ConnectionClosed(4500, f"the token is for device {welcome.get('device')!r},"
                                         f" not {self._want_device!r}")
        self.user, self.device = str(welcome["user"]), str(welcome["device"])
        self.server = str(welcome.get("server", ""))
        self.heartbeat = float(welcome.get("heartbeat") or DEFAULT_HEARTBEAT)
        self.max_body_bytes = int((welcome.get("limits") or {}).get("max_body_bytes") or 0)
        self._conn = conn
        self._acked.clear()
        assert self._online is not None
        self._online.set()
        for frame, future in list(self._sends.values()):
            if not future.done():
                conn.send(frame)  # same cmid: stored once however often we try
        self._flush_acks()  # what was processed while we were offline
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._heartbeat(conn), name="imfast-heartbeat"))

    def _raise_for_close(self, conn: _Connection) -> None:
        code, reason = conn.close_code, conn.close_reason or conn.auth_error
        if not self._should_reconnect(code):
            raise ConnectionClosed(code, reason or "closed before authenticating")
        raise ConnectionLost(f"closed before authenticating ({code} {reason})")

    def _should_reconnect(self, code: int) -> bool:
        if code == 4006 and self._token_provider is None:
            return False  # the same token would expire again: give up, say why
        if code == CloseCode.REPLACED:
            # Another client of this user and device connected: taking the session back
            # would close that one with 4005, which would take it back in turn, for ever.
            return False
        return is_reconnect_code(code)

    def _on_disconnected(self, conn: _Connection) -> None:
        if not conn.done.done():
            conn.done.set_result(None)
        if conn is self._conn and self._online is not None:
            self._online.clear()
        lost = ConnectionLost(f"connection closed ({conn.close_code} {conn.close_reason})")
        for future in conn.requests.values():
            if not future.done():
                future.set_exception(lost)

    async def _heartbeat(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        interval = max(0.5, self.heartbeat / 3)
        while not conn.done.done():
            try:
                await asyncio.wait_for(asyncio.shield(conn.done), interval)
                return
            except TimeoutError:
                pass
            if loop.time() - conn.last_rx > 2 * interval:
                log.info("no traffic for %.0f s: treating the connection as lost", 2 * interval)
                conn.transport.disconnect(graceful=False)
                return
            conn.send({"type": "ping"})

    def _delay(self, attempt: int) -> float:
        first, largest = self._backoff
        return float(min(largest, first * 2.0 ** min(attempt, 16)) * random.uniform(0.5, 1.0))

    async def _supervise(self) -> None:
        """Wait for the connection to end; reconnect with backoff or stop for good."""
        while True:
            conn = self._conn
            assert conn is not None
            await asyncio.shield(conn.done)
            if self._closing:
                return
            code, reason = conn.close_code, conn.close_reason
            attempt = 0
            while True:
                if not self._should_reconnect(code):
                    if code == 4006:
                        reason = f"{reason} (pass token_provider= to reconnect with a fresh token)"
                    self._stop(ConnectionClosed(code, reason))
                    return
                delay = self._retry_hint if self._retry_hint is not None else self._delay(attempt)
                self._retry_hint = None
                attempt += 1
                log.info("disconnected (%s %s); reconnecting in %.2f s", code, reason, delay)
                self._emit(Disconnected(code, reason, delay))
                await asyncio.sleep(delay)
                if self._closing:
                    return
                try:
                    await self._open()
                    break
                except ConnectionClosed as exc:
                    code, reason = exc.code, exc.reason
                except WSInvalidStatusError as exc:
                    status = exc.response.status if exc.response is not None else 0
                    code, reason = (1013 if int(status) >= 500 or int(status) == 429
                                    else 4500), _describe(exc)
                    self._retry_hint = _retry_after(exc, self._delay(attempt))
                except (OSError, TimeoutError, WSError, ConnectionLost) as exc:
                    code, reason = 1006, _describe(exc)

    def _stop(self, exc: ConnectionClosed, *, emit: bool = True, terminal: bool = True) -> None:
        """Stop for good: fail pending calls with ``exc`` and end the event stream."""
        if self._stopped is None or self._stopped.is_set():
            return
        if terminal:
            self._error = exc
            log.info("stopped: %s", exc)
        if emit:
            self._emit(Disconnected(exc.code, exc.reason, None))
        for _frame, future in self._sends.values():
            if not future.done():
                future.set_exception(exc)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        try:
            self._store.save(self._processed)
        except OSError as err:
            log.warning("cannot save the cursor store: %s", err)
        if self._online is not None:
            self._online.clear()
        self._queue.put_nowait(_END)
        self._stopped.set()


class _Own:
    """An entry this device sent, seen again after a reconnect: processed, not shown."""

    __slots__ = ("conv", "seq")

    def __init__(self, conv: str, seq: int) -> None:
        self.conv = conv
        self.seq = seq


async def _either(a: asyncio.Future[Any], b: asyncio.Future[Any]) -> None:
    """Wait until one of the two futures is done."""
    pending: list[asyncio.Future[Any]] = [a, b]
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)


# The server answers a malformed frame with an error it cannot tie to a request
# (no id): check here, so a bad argument raises at once instead of timing out.
def _check_conv(conv: str) -> None:
    if parse_conv(conv) is None:
        raise ValueError(f"{conv!r} is not a conversation id (p:<a>:<b> sorted, or g:<group>)")


def _check_ids(*ids: str) -> list[str]:
    for value in ids:
        if not is_valid_id(value):
            raise ValueError(f"{value!r} is not a valid id (1-64 of A-Z a-z 0-9 _ . @ -)")
    return list(ids)


def _check_id_list(name: str, ids: Iterable[str]) -> list[str]:
    """``ids`` checked; a lone string is refused (iterating it would name its letters)."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be a list of ids, not the string {ids!r} "  # noqa: TRY004 - docs/client.md: bad arguments raise ValueError
                         f"(for one user: [{ids!r}])")
    return _check_ids(*ids)


def _check_seq(**seqs: int | None) -> None:
    for name, value in seqs.items():
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")


def _retry_after(exc: WSInvalidStatusError, backoff: float) -> float | None:
    """The wait a 429/503 asks for (``Retry-After`` seconds, with jitter), or None."""
    response = exc.response
    if response is None or int(response.status) not in (429, 503):
        return None
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    if not 0 <= seconds <= 3600:
        return None
    return max(backoff, seconds * random.uniform(1.0, 1.5))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, WSInvalidStatusError) and exc.response is not None:
        body = (exc.raw_body or b"").decode("utf-8", "replace").strip()
        return f"HTTP {int(exc.response.status)} {body}".strip()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
