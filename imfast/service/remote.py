"""The Router over the internal link: the gateway's stub and the service's handler.

:class:`RemoteRouter` offers the gateway the same methods as
:class:`~imfast.service.router.Router` (the ones a Session uses), each one a
call over the link to im-service (port 9094).  :func:`serve_router` is the
service's side: it runs the named Router method and encodes the result.
Errors travel as (code, message, field) and are re-raised as ImfastError, so
a client sees the same error frame in embedded and distributed mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from imfast.backends.base import StoredMessage
from imfast.link.endpoints import LinkClient
from imfast.link.replicas import ServiceLinks
from imfast.protocol.codes import ImfastError
from imfast.protocol.ids import group_conv, private_conv
from imfast.service.router import Router, SendResult, settle

__all__ = ["RemoteRouter", "entry_from_wire", "entry_to_wire", "serve_router"]

#: Router methods a gateway may call, and how their results are encoded.
_ENTRIES = {"fetch", "history"}
_RESULTS = {"recall"}
_PLAIN = {"ack", "presence", "conversations", "resume_plan", "cursors", "cursor", "read", "typing",
          "receipts", "group_create", "group_join", "group_invite", "group_remove",
          "group_leave", "group_role", "group_list_members", "groups_of"}
ALLOWED = _ENTRIES | _RESULTS | _PLAIN | {"send"}
#: Requests a gateway may send as casts (no answer unless they fail).
#: ``own_ack`` moves the sender's cursor past its own message (the gateway's batch of
#: them): an ack the client never sent, so the gateway drops its failure.
_CASTS = {"ack", "own_ack", "read", "typing"}
#: Calls that add an entry (a membership event) to the group's conversation.
_GROUP_CHANGES = {"group_create", "group_join", "group_invite", "group_remove", "group_leave",
                  "group_role"}


def entry_to_wire(m: StoredMessage) -> list[Any]:
    return [m.conv, m.seq, m.msg_id, m.sender, m.sender_device, m.cmid, m.body, m.ts, m.kind]


def entry_from_wire(w: list[Any]) -> StoredMessage:
    return StoredMessage(*w)


def _result_to_wire(r: SendResult) -> list[Any]:
    return [r.msg_id, r.conv, r.seq, r.ts, r.duplicate]


def _result_from_wire(w: list[Any]) -> SendResult:
    return SendResult(*w)


def _decoded(decode: Callable[[Any], Any],
             done: Callable[[Any, BaseException | None], None]) -> Callable[[Any, Any], None]:
    """An answer that hands ``done`` the decoded result, or the error."""
    def answer(result: Any, exc: BaseException | None) -> None:
        done(None if exc is not None else decode(result), exc)

    return answer


def serve_router(router: Router, extra: dict[str, Callable[..., Awaitable[Any]]] | None = None
                 ) -> Callable[[str, Any], Awaitable[Any]]:
    """A link handler running ``router``'s methods for gateways (and ``extra``'s:
    method name -> coroutine function of the call's arguments).

    Its ``now`` attribute is the link's hot path (see imfast.link.wire's
    NowHandler): a send or an ack the router can take without waiting
    (:meth:`Router.send_now`, :meth:`Router.send_group_now`,
    :meth:`Router.ack_now`) is taken in the call that read it, with the same
    order, dedup and answers as the coroutine.
    """

    def now(method: str, args: list[Any], answer: Any) -> bool:
        if method == "send":
            user, device, cmid, to, group, body = args

            def reply(result: SendResult | None, exc: BaseException | None) -> None:
                answer(None if result is None else _result_to_wire(result), exc)

            if to is None:
                return router.send_group_now(user, device, cmid, group, body, reply)
            return router.send_now(user, device, cmid, to, body, reply)
        if method == "ack":
            cursor = router.ack_now(*args)
            if cursor is None:
                return False
            answer(cursor, None)
            return True
        return False

    extra = extra or {}

    async def handle(method: str, args: list[Any]) -> Any:
        own = extra.get(method)
        if own is not None:
            return await own(*args)
        if method not in ALLOWED:
            raise ImfastError(f"unknown internal method {method}", code="internal")
        if method == "send":
            pending = await router.submit_send(*args)
            result = pending if isinstance(pending, SendResult) else await pending
            return _result_to_wire(result)
        value = await getattr(router, method)(*args)
        if method in _ENTRIES:
            return [entry_to_wire(m) for m in value]
        if method in _RESULTS:
            return _result_to_wire(value)
        return value

    def cast(method: str, args: list[Any], link: Any) -> None:
        """A cast (an ack, read or typing nobody waits to hear about), in arrival order.

        An ack, read or typing the router can take now (``ack_now``,
        ``read_now``, ``typing_now``) is taken in this call; anything else runs
        as a task, which answers every error the same way.  A failure goes back
        to the gateway as ``cast_failed``, which answers the client with the
        error frame the request would have got.
        """
        if method not in _CASTS:
            link.cast_failed(method, args, ImfastError(f"unknown internal cast {method}",
                                                       code="internal"))
            return
        name = "ack" if method == "own_ack" else method
        try:  # what the router can take now, in this call (no task)
            if name == "ack":
                user, device, conv, seq = args
                # Nobody is told a cast ack's cursor: the store may move it without a read.
                taken = router.ack_now(user, device, conv, seq, exact=False) is not None
            elif name == "read":
                taken = router.read_now(*args)
            else:
                taken = router.typing_now(*args)
            if taken:
                return
        except Exception as exc:  # noqa: BLE001 - reported to the client
            link.cast_failed(method, args, exc)
            return

        async def run() -> None:
            try:
                await getattr(router, name)(*args)
            except Exception as exc:  # noqa: BLE001 - reported to the client
                link.cast_failed(method, args, exc)

        asyncio.get_running_loop().create_task(run())

    handle.now = now  # type: ignore[attr-defined]
    handle.cast = cast  # type: ignore[attr-defined]
    return handle


class RemoteRouter:
    """Router methods as calls over a :class:`LinkClient` (see module docstring).

    With a :class:`~imfast.link.replicas.ServiceLinks`, every call that adds an
    entry to a conversation (send, recall, group changes) goes to the replica
    that owns the conversation, so one router orders its entries.
    """

    def __init__(self, link: LinkClient | ServiceLinks, *, moves_own_cursors: bool = False) -> None:
        self.link = link
        #: The far router's :attr:`~imfast.service.router.Router.moves_own_cursors`: told
        #: by whoever starts this process (the embedded supervisor); im-service's is False.
        self.moves_own_cursors = moves_own_cursors

    def _owner(self, conv: str) -> LinkClient | ServiceLinks:
        link = self.link
        return link.for_key(conv) if isinstance(link, ServiceLinks) else link

    def _send(self, user: str, device: str, cmid: str, to: str | None, group: str | None,
              body: str, reply: Any) -> None:
        """Queue a send on the link now (frame order); ``reply(result, exc)`` once answered."""
        conv = private_conv(user, to) if to is not None else group_conv(group or "")
        self._owner(conv).call_with("send", [user, device, cmid, to, group, body],
                                    _decoded(_result_from_wire, reply))

    async def submit_send(self, user: str, device: str, cmid: str, to: str | None,
                          group: str | None, body: str) -> asyncio.Future[SendResult]:
        # Queued now, in frame order; the reply comes once the message is durable.
        out: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._send(user, device, cmid, to, group, body, partial(settle, out))
        return out

    def send_now(self, user: str, device: str, cmid: str, to: str, body: str,
                 reply: Any) -> bool:
        """A private send queued on the link now; ``reply(result, exc)`` once answered.

        The Session's hot path (no coroutine, no task): the same request, order
        and answers as :meth:`submit_send`.  Always taken.
        """
        self._send(user, device, cmid, to, None, body, reply)
        return True

    def cast(self, method: str, args: list[Any]) -> bool:
        """An ack, read or typing sent as a cast (no answer unless it fails); False if
        the link is down (call instead, which waits for it)."""
        return self.link.cast(method, args)

    def send_group_now(self, user: str, device: str, cmid: str, group: str, body: str,
                       reply: Any) -> bool:
        """:meth:`send_now` for a group send (im-service takes it in the call that reads it
        when it holds the group's members, on its task path otherwise)."""
        self._send(user, device, cmid, None, group, body, reply)
        return True

    def ack_with(self, user: str, device: str, conv: str, seq: int, done: Any) -> None:
        """An ack queued on the link now; ``done(cursor, exc)`` once im-service answers."""
        self.link.call_with("ack", [user, device, conv, seq], done)

    async def fetch(self, user: str, conv: str, after: int, limit: int) -> list[StoredMessage]:
        return [entry_from_wire(w) for w in await self.link.call("fetch", [user, conv, after,
                                                                            limit])]

    async def history(self, user: str, conv: str, before: int | None, after: int | None,
                      limit: int) -> list[StoredMessage]:
        rows = await self.link.call("history", [user, conv, before, after, limit])
        return [entry_from_wire(w) for w in rows]

    async def recall(self, user: str, device: str, conv: str, seq: int) -> SendResult:
        return _result_from_wire(await self._owner(conv).call("recall",
                                                             [user, device, conv, seq]))

    async def resume_plan(self, user: str, device: str) -> list[tuple[str, int, int]]:
        return [tuple(p) for p in await self.link.call("resume_plan", [user, device])]

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        if method not in _PLAIN:
            raise AttributeError(method)

        if method in _GROUP_CHANGES:
            async def change(*args: Any) -> Any:  # (user, device, group, ...)
                return await self._owner(group_conv(args[2])).call(method, list(args))
            return change

        async def call(*args: Any) -> Any:
            return await self.link.call(method, list(args))

        return call
