"""RFC 6455 message layer on top of picows frames.

picows parses frames (and already refuses unmasked client frames, reserved
opcodes, fragmented or oversized control frames, and frames over
``max_frame_size``).  It leaves the rest to the application; this class does
it, identically for ``/ws`` and the conformance echo endpoint:

* reassembles fragmented messages, refusing continuation frames with no start
  and new data frames inside a fragmented message (1002), and messages whose
  fragments add up past the limit (1009) before buffering them;
* refuses RSV bits (no extension is negotiated) with 1002;
* validates UTF-8 of text messages (1007) - for the chat protocol lazily, only
  when JSON parsing fails, so valid traffic pays nothing extra;
* answers pings itself with a rate limit (flood -> 1008), ignores pongs;
* follows the closing handshake rules: echoes a valid close code, answers an
  invalid one (0-999, 1004-1006, 1015-2999, >= 5000, 1-byte payload, bad
  UTF-8 reason) with 1002, then disconnects.

Subclasses implement :meth:`FramedListener.on_message`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from imfast.protocol.codes import CloseCode

__all__ = ["FramedListener", "valid_close_code", "CLOSE_GRACE_SECONDS"]

#: How long we wait for the peer's CLOSE reply before dropping the TCP connection.
CLOSE_GRACE_SECONDS = 2.0

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONT = WSMsgType.CONTINUATION
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG
_CLOSE = WSMsgType.CLOSE


def valid_close_code(code: int) -> bool:
    """Close codes a peer may send (RFC 6455 section 7.4)."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


class FramedListener(WSListener):  # type: ignore[misc]
    """Message-level WebSocket handling shared by every endpoint."""

    __slots__ = ("transport", "raw", "closed", "_frag", "_frag_text", "_frag_size",
                 "max_message", "ping_tokens", "ping_ts")

    def __init__(self, max_message: int) -> None:
        self.transport: Any = None
        self.raw: Any = None
        self.closed = False
        self._frag: list[bytes] | None = None
        self._frag_text = False
        self._frag_size = 0
        self.max_message = max_message
        self.ping_tokens = 20.0
        self.ping_ts = 0.0

    # Subclass hooks -------------------------------------------------------
    def on_message(self, payload: bytes, is_text: bool, validated: bool) -> None:
        """One complete message; ``validated`` is True if its UTF-8 was checked."""
        raise NotImplementedError

    def on_activity(self) -> None:
        """Any frame arrived (heartbeat bookkeeping)."""

    def now(self) -> float:
        """A coarse clock for the ping rate limit."""
        return 0.0

    # picows callbacks -----------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = transport.underlying_transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.closed:
            # We sent CLOSE and wait for the peer's CLOSE (RFC 6455 7.1.1); the rest is
            # discarded.  Closing TCP earlier would make the kernel answer the peer's
            # in-flight data with RST, which can destroy our close frame on its side.
            if frame.msg_type is _CLOSE:
                transport.disconnect()
            return
        self.on_activity()
        msg_type = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.fail(CloseCode.PROTOCOL_ERROR, "RSV bits set without a negotiated extension")
            return
        if msg_type is _TEXT or msg_type is _BINARY:
            if self._frag is not None:
                self.fail(CloseCode.PROTOCOL_ERROR, "new data frame inside a fragmented message")
                return
            if frame.fin:
                self.on_message(frame.get_payload_as_bytes(), msg_type is _TEXT, False)
                return
            self._frag_text = msg_type is _TEXT
            self._frag_size = 0
            self._frag = []
            self._add_fragment(frame)
        elif msg_type is _CONT:
            if self._frag is None:
                self.fail(CloseCode.PROTOCOL_ERROR, "continuation frame with no message started")
                return
            if not self._add_fragment(frame):
                return
            if frame.fin:
                payload = b"".join(self._frag)
                self._frag = None
                if self._frag_text:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        self.fail(CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8")
                        return
                self.on_message(payload, self._frag_text, True)
        elif msg_type is _PING:
            if not self._ping_allowed():
                self.fail(CloseCode.POLICY_VIOLATION, "ping flood")
                return
            transport.send_pong(frame.get_payload_as_bytes())
        elif msg_type is _CLOSE:
            self._on_close_frame(transport, frame)
        # PONG: activity only.

    def _add_fragment(self, frame: WSFrame) -> bool:
        size = frame.payload_size
        self._frag_size += size
        if self._frag_size > self.max_message:
            self._frag = None
            self.fail(CloseCode.TOO_BIG, "fragmented message over the size limit")
            return False
        assert self._frag is not None
        self._frag.append(frame.get_payload_as_bytes())
        if self._frag_text and len(self._frag) % 64 == 0:
            # Fail fast on long fragmented text: check what is complete so far.
            try:
                b"".join(self._frag).decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.reason != "unexpected end of data":
                    self.fail(CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8")
                    return False
        return True

    def _ping_allowed(self) -> bool:
        now = self.now()
        self.ping_tokens = min(20.0, self.ping_tokens + (now - self.ping_ts) * 5.0)
        self.ping_ts = now
        if self.ping_tokens < 1.0:
            return False
        self.ping_tokens -= 1.0
        return True

    def _on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        if len(payload) == 0:
            reply = CloseCode.NORMAL
        elif len(payload) == 1:
            reply = CloseCode.PROTOCOL_ERROR
        else:
            code = int.from_bytes(payload[:2], "big")
            try:
                payload[2:].decode("utf-8")
                reason_ok = True
            except UnicodeDecodeError:
                reason_ok = False
            reply = (CloseCode(code) if code in CloseCode._value2member_map_ else code) \
                if valid_close_code(code) and reason_ok else CloseCode.PROTOCOL_ERROR
        self.closed = True
        transport.send_close(WSCloseCode(int(reply)))
        transport.disconnect()

    # Helpers for subclasses -----------------------------------------------
    def fail(self, code: int, reason: str) -> None:
        """Close the connection with ``code``: close frame, then disconnect."""
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.send_close(WSCloseCode(int(code)), reason.encode()[:120])
            # Disconnect when the peer's CLOSE arrives (on_ws_frame), or after a grace period.
            asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, transport.disconnect)
