"""The internal link between gateways and im-service: framed, batched, multiplexed.

One TCP connection carries many concurrent calls.  Each frame is a 4-byte
big-endian length followed by an orjson array:

* ``[0, id, method, args]``     request, answered by exactly one response
* ``[1, id, result]``           success
* ``[2, id, code, message, field]``  failure (an :class:`ImfastError` re-raised by the caller)
* ``[3, method, args]``         one-way push (deliveries, events)
* ``[4, method, args]``         cast: a request whose success is not answered (an
  ack, a read receipt, a typing indicator the client asked no reply for); a
  failure comes back as a push ``cast_failed`` ``[method, args, code, message,
  field]`` on the same connection (:meth:`LinkProtocol.cast_failed`)

Guarantees of :class:`LinkProtocol`:

* frames are written in the order they were queued, and everything queued in
  one loop iteration goes out in one ``write()`` (the same coalescing lever
  as the client side: a loopback ``send()`` costs ~14 us);
* requests are handed to the handler in arrival order; each call's response
  finds its caller by id, whatever order responses come back in;
* when the connection drops, every pending call fails with
  ``unavailable``, so no caller waits forever; with a ``call_timeout`` a call
  unanswered for that long fails with ``unavailable`` too (checked about
  once a second: one timer per connection, not one per call);
* a handler with a ``now`` attribute (see :data:`NowHandler`) may answer a
  request in the call that received it, with no task: the link's own hot path;
* casts reach the handler's ``cast`` attribute (see :data:`CastHandler`) in
  arrival order with the requests around them (a request the handler leaves
  to its task path runs later, as always), so a cast acknowledging a seq
  follows the send that stored it.  A cast costs one frame instead of a
  request, a reply, a future and its callback.  A cast lost with the
  connection is not reported: casts carry only what a client asked no
  answer for - an ack the next resume makes up for, a receipt, an indicator;
* a call's answer is a callback run as the reply is read
  (:meth:`LinkProtocol.call_with`; :meth:`LinkProtocol.call` wraps it in a
  future);
* :meth:`LinkProtocol.close` writes what is queued, then the push :data:`BYE`
  (never handed to ``on_push``), so either end can tell a link closed in order
  (``farewell``) from one that broke, when pushes in flight may have been lost.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson

from imfast.backends.errors import BackendUnavailable
from imfast.protocol.codes import ImfastError

__all__ = ["BYE", "CAST", "ERROR", "MAX_FRAME", "OK", "PUSH", "REQUEST", "LinkProtocol"]

log = logging.getLogger("imfast.link")

REQUEST, OK, ERROR, PUSH, CAST = 0, 1, 2, 3, 4
MAX_FRAME = 64 * 1024 * 1024
#: The last push on a link closed in order: nothing queued before it was lost.
BYE = "bye"
_HEADER = struct.Struct(">I")

Handler = Callable[[str, Any], Awaitable[Any]]
PushHandler = Callable[[str, Any], None]
#: ``answer(result, exc)``: how a :data:`NowHandler` replies, once, now or later.
Answer = Callable[[Any, "BaseException | None"], None]
#: ``handler.now(method, args, answer) -> bool``: True if it took the request (and will
#: call ``answer`` exactly once); False, having changed nothing, for the task path.
NowHandler = Callable[[str, Any, Answer], bool]
#: ``handler.cast(method, args, link)``: take a cast; report a failure with
#: ``link.cast_failed(method, args, exc)``.
CastHandler = Callable[[str, Any, "LinkProtocol"], None]
_SWEEP_EVERY = 1.0  # seconds between checks for calls past their timeout


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """The :data:`Answer` of :meth:`LinkProtocol.call`: settle its future (unless cancelled)."""
    if fut.done():
        return
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)


def _failure(method: str, exc: BaseException) -> tuple[str, str, str | None]:
    """(code, message, field) of a failed request or cast; an unexpected one is logged."""
    if isinstance(exc, ImfastError):
        return exc.code, exc.message, exc.field
    if isinstance(exc, BackendUnavailable):  # passes without a code change: retry
        log.warning("link call %s: %s", method, exc)
        return "unavailable", f"{exc}; retry", None
    log.error("link call %s failed", method, exc_info=exc)
    return "internal", f"internal error: {type(exc).__name__}", None


def _tell(answer: Answer, result: Any, exc: BaseException | None) -> None:
    """Run one caller's answer; its failure is logged, never the link's."""
    try:
        answer(result, exc)
    except Exception:
        log.exception("a link call's answer failed")


def _keep_alive(sock: Any) -> None:
    """TCP keepalive and a user timeout on a link socket: a peer whose host died or
    was cut off is noticed in about half a minute (the connection fails: a sender
    then treats its pushes as possibly lost, a gateway its incoming pushes), not
    after the kernel's two hours.  Best effort: an option the platform lacks is
    skipped."""
    if sock is None:
        return
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", 30_000)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except (OSError, AttributeError):
            continue


class LinkProtocol(asyncio.Protocol):
    """Both ends of a link: sends calls/pushes, serves incoming ones."""

    def __init__(self, handler: Handler | None = None, on_push: PushHandler | None = None,
                 on_lost: Callable[[LinkProtocol], None] | None = None,
                 call_timeout: float | None = None, name: str = "") -> None:
        self._handler = handler
        self._now: NowHandler | None = getattr(handler, "now", None)
        self._cast: CastHandler | None = getattr(handler, "cast", None)
        self._on_push = on_push
        self._call_timeout = call_timeout
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._next_id = 0
        #: call id -> (answer, deadline, method); ids and deadlines rise together.
        self._pending: dict[int, tuple[Answer, float, str]] = {}
        self.closed = False
        #: Closed in order: by this end, or the peer said BYE (see module docstring).
        self.farewell = False
        self.pushes_in = 0
        self.pushes_out = 0
        self.peer = ""
        self.name = name  # the address it was asked to reach, for messages (else the peer)

    # ----------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self._transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
            _keep_alive(transport.get_extra_info("socket"))
        else:  # a Unix domain socket: the client end is unnamed
            self.peer = peer or "local"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        pending, self._pending = self._pending, {}
        for answer, _, _ in pending.values():
            _tell(answer, None, ImfastError("internal link lost; retry", code="unavailable"))
        if self._on_lost is not None:
            self._on_lost(self)

    def close(self, orderly: bool = True) -> None:
        """Write what is queued and (``orderly``) :data:`BYE`, then close."""
        if orderly and self._transport is not None and not self.closed and not self.farewell:
            self.farewell = True
            body = orjson.dumps([PUSH, BYE, None])
            self._out.append(_HEADER.pack(len(body)) + body)
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        if buf:
            buf += data
            if len(buf) < 4 or len(buf) - 4 < _HEADER.unpack_from(buf, 0)[0] <= MAX_FRAME:
                return  # the frame begun earlier is still incomplete: no copy yet
            data = bytes(buf)
            buf.clear()
        # Frames are parsed straight from the received bytes (no copy per frame);
        # only an incomplete tail is kept for the next read.
        pos = 0
        end = len(data)
        with memoryview(data) as view:
            while end - pos >= 4:
                (size,) = _HEADER.unpack_from(data, pos)
                if size > MAX_FRAME:
                    log.error("link frame too large (%d bytes) from %s; closing", size,
                              self.peer)
                    self.close(orderly=False)
                    return
                if end - pos - 4 < size:
                    break
                frame = orjson.loads(view[pos + 4:pos + 4 + size])
                pos += 4 + size
                self._dispatch(frame)
        if pos < end:
            buf += data[pos:]

    # ------------------------------------------------------------- sending
    def _queue(self, frame: Any) -> None:
        if self.closed or self._transport is None:
            raise ImfastError("internal link is down; retry", code="unavailable")
        body = orjson.dumps(frame)
        self._out.append(_HEADER.pack(len(body)) + body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr] # set with the transport

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    def call(self, method: str, args: Any) -> asyncio.Future[Any]:
        """Send a request; the future resolves to its result or raises ImfastError."""
        fut: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        self.call_with(method, args, partial(_settle, fut))
        return fut

    def call_with(self, method: str, args: Any, answer: Answer) -> None:
        """Send a request; ``answer(result, None)`` or ``answer(None, ImfastError)`` once.

        The answer is called as the reply is read - no future, no extra loop
        iteration: the path of every send and ack a gateway forwards.
        """
        self._next_id += 1
        call_id = self._next_id
        self._queue([REQUEST, call_id, method, args])
        timeout = self._call_timeout
        self._pending[call_id] = (answer, time.monotonic() + timeout if timeout else 0.0, method)
        if timeout and self._sweeper is None:
            self._sweeper = self._loop.call_later(  # type: ignore[union-attr]
                min(_SWEEP_EVERY, timeout), self._sweep)

    def _sweep(self) -> None:
        """Fail the calls past their deadline with ``unavailable`` (the far side is stuck)."""
        self._sweeper = None
        pending = self._pending
        now = time.monotonic()
        expired = []
        for call_id, (_, deadline, _) in pending.items():
            if deadline > now:
                break  # the rest were made later
            expired.append(call_id)
        for call_id in expired:
            answer, _, method = pending.pop(call_id)
            # Overloaded or stuck: the caller may retry (sends are deduplicated by
            # cmid), so this is `unavailable`, not `internal`.
            _tell(answer, None, ImfastError(
                f"{self.name or self.peer} did not answer {method} within {self._call_timeout:g} s; "
                "retry", code="unavailable"))
        if pending and not self.closed and self._call_timeout:
            self._sweeper = self._loop.call_later(  # type: ignore[union-attr]
                min(_SWEEP_EVERY, self._call_timeout), self._sweep)

    def push(self, method: str, args: Any) -> None:
        """Send a one-way message (no answer)."""
        self._queue([PUSH, method, args])
        self.pushes_out += 1

    def cast(self, method: str, args: Any) -> None:
        """Send a request whose success is not answered (see module docstring)."""
        self._queue([CAST, method, args])

    def cast_failed(self, method: str, args: Any, exc: BaseException) -> None:
        """Tell the caster that its cast failed with ``exc`` (encoded as a reply's error)."""
        if not self.closed:
            self.push("cast_failed", [method, args, *_failure(method, exc)])

    # ----------------------------------------------------------- receiving
    def _dispatch(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == OK:
            call = self._pending.pop(frame[1], None)
            if call is not None:
                _tell(call[0], frame[2], None)
        elif kind == ERROR:
            call = self._pending.pop(frame[1], None)
            if call is not None:
                _tell(call[0], None, ImfastError(frame[3], code=frame[2], field=frame[4]))
        elif kind == PUSH:
            if frame[1] == BYE:
                self.farewell = True
                return
            self.pushes_in += 1
            if self._on_push is not None:
                try:
                    self._on_push(frame[1], frame[2])
                except Exception:
                    log.exception("link push %s failed", frame[1])
        elif kind == CAST:
            if self._cast is None:  # a wiring mistake: say so, to the log and the caller
                log.error("link cast %s from %s: nothing here takes casts", frame[1], self.peer)
                self.cast_failed(frame[1], frame[2], ImfastError(
                    "internal error: cast not served", code="internal"))
                return
            try:
                self._cast(frame[1], frame[2], self)
            except Exception:
                log.exception("link cast %s failed", frame[1])
        elif kind == REQUEST and self._handler is not None:
            now = self._now
            if now is not None:
                call_id = frame[1]
                try:
                    if now(frame[2], frame[3], lambda result, exc: self._answer(
                            call_id, frame[2], result, exc)):
                        return
                except Exception as exc:  # noqa: BLE001 - answered like the task path's
                    self._answer(call_id, frame[2], None, exc)
                    return
            self._loop.create_task(  # type: ignore[union-attr]
                self._serve(frame[1], frame[2], frame[3]))

    async def _serve(self, call_id: int, method: str, args: Any) -> None:
        assert self._handler is not None
        try:
            result = await self._handler(method, args)
        except Exception as exc:  # noqa: BLE001 - _answer encodes (and logs) it
            self._answer(call_id, method, None, exc)
        else:
            self._answer(call_id, method, result, None)

    def _answer(self, call_id: int, method: str, result: Any,
                exc: BaseException | None) -> None:
        """Queue the reply to one request: its result, or its failure as (code, message)."""
        if exc is None:
            reply: list[Any] = [OK, call_id, result]
        else:
            reply = [ERROR, call_id, *_failure(method, exc)]
        if not self.closed:
            try:
                self._queue(reply)
            except ImfastError:
                pass
