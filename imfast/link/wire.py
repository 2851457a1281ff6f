"""The internal link between gateways and im-service: framed, batched, multiplexed.

One TCP connection carries many concurrent calls.  Each frame is a 4-byte
big-endian length followed by an orjson array:

* ``[0, id, method, args]``     request, answered by exactly one response
* ``[1, id, result]``           success
* ``[2, id, code, message, field]``  failure (an :class:`ImfastError` re-raised by the caller)
* ``[3, method, args]``         one-way push (deliveries, events)

Guarantees of :class:`LinkProtocol`:

* frames are written in the order they were queued, and everything queued in
  one loop iteration goes out in one ``write()`` (the same coalescing lever
  as the client side: a loopback ``send()`` costs ~14 us);
* requests are handed to the handler in arrival order; each call's response
  finds its caller by id, whatever order responses come back in;
* when the connection drops, every pending call fails with
  ``unavailable``, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from imfast.backends.errors import BackendUnavailable
from imfast.protocol.codes import ImfastError

__all__ = ["ERROR", "MAX_FRAME", "OK", "PUSH", "REQUEST", "LinkProtocol"]

log = logging.getLogger("imfast.link")

REQUEST, OK, ERROR, PUSH = 0, 1, 2, 3
MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct(">I")

Handler = Callable[[str, Any], Awaitable[Any]]
PushHandler = Callable[[str, Any], None]


class LinkProtocol(asyncio.Protocol):
    """Both ends of a link: sends calls/pushes, serves incoming ones."""

    def __init__(self, handler: Handler | None = None, on_push: PushHandler | None = None,
                 on_lost: Callable[[LinkProtocol], None] | None = None) -> None:
        self._handler = handler
        self._on_push = on_push
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.closed = False
        self.peer = ""

    # ----------------------------------------------------------- transport
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack alike.
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ImfastError("internal link lost; retry", code="unavailable"))
        if self._on_lost is not None:
            self._on_lost(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if size > MAX_FRAME:
                log.error("link frame too large (%d bytes) from %s; closing", size, self.peer)
                self.close()
                return
            if end - pos - 4 < size:
                break
            frame = orjson.loads(bytes(buf[pos + 4:pos + 4 + size]))
            pos += 4 + size
            self._dispatch(frame)
        if pos:
            del buf[:pos]

    # ------------------------------------------------------------- sending
    def _queue(self, frame: Any) -> None:
        if self.closed or self._transport is None:
            raise ImfastError("internal link is down; retry", code="unavailable")
        body = orjson.dumps(frame)
        self._out.append(_HEADER.pack(len(body)) + body)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    def call(self, method: str, args: Any) -> asyncio.Future[Any]:
        """Send a request; the future resolves to its result or raises ImfastError."""
        self._next_id += 1
        call_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue([REQUEST, call_id, method, args])
        self._pending[call_id] = fut
        return fut

    def push(self, method: str, args: Any) -> None:
        """Send a one-way message (no answer)."""
        self._queue([PUSH, method, args])

    # ----------------------------------------------------------- receiving
    def _dispatch(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == OK:
            fut = self._pending.pop(frame[1], None)
            if fut is not None and not fut.done():
                fut.set_result(frame[2])
        elif kind == ERROR:
            fut = self._pending.pop(frame[1], None)
            if fut is not None and not fut.done():
                fut.set_exception(ImfastError(frame[3], code=frame[2], field=frame[4]))
        elif kind == PUSH:
            if self._on_push is not None:
                try:
                    self._on_push(frame[1], frame[2])
                except Exception:
                    log.exception("link push %s failed", frame[1])
        elif kind == REQUEST and self._handler is not None:
            asyncio.get_running_loop().create_task(self._serve(frame[1], frame[2], frame[3]))

    async def _serve(self, call_id: int, method: str, args: Any) -> None:
        assert self._handler is not None
        try:
            result = await self._handler(method, args)
        except ImfastError as exc:
            reply: list[Any] = [ERROR, call_id, exc.code, exc.message, exc.field]
        except BackendUnavailable as exc:  # passes without a code change: retry
            log.warning("link call %s: %s", method, exc)
            reply = [ERROR, call_id, "unavailable", f"{exc}; retry", None]
        except Exception as exc:
            log.exception("link call %s failed", method)
            reply = [ERROR, call_id, "internal", f"internal error: {type(exc).__name__}", None]
        else:
            reply = [OK, call_id, result]
        if not self.closed:
            try:
                self._queue(reply)
            except ImfastError:
                pass
