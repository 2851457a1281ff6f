"""RFC 6455 message layer on top of picows frames.

picows parses frames (and already refuses unmasked client frames, reserved
opcodes, fragmented or oversized control frames, 64-bit lengths with the top
bit set, frames over ``max_frame_size``, and close frames with a 1-byte
payload, an unregistered code below 3000 or a reason that is not UTF-8).  It
leaves the rest to the application; this class does it, identically for
``/ws`` and the conformance echo endpoint:

* reassembles fragmented messages, refusing continuation frames with no start
  and new data frames inside a fragmented message (1002), and messages whose
  fragments add up past the limit (1009) before buffering them;
* refuses RSV bits (no extension is negotiated) with 1002;
* validates UTF-8 of text messages (1007): fragmented ones incrementally, so a
  bad fragment fails the connection as it arrives; single-frame ones - the
  whole of ``/ws`` chat traffic - are left to :meth:`FramedListener.on_message`
  (``validated=False``), which for the chat protocol checks only when JSON
  parsing fails, so valid traffic pays nothing extra;
* answers pings itself with a rate limit (flood -> 1008), ignores pongs;
* follows the closing handshake rules: echoes a valid close code, answers an
  invalid one (0, 1006, >= 5000) with 1002, then disconnects; after a close
  frame was sent (by us or by picows on a parse error) every frame but the
  peer's CLOSE is discarded; what the peer sends after its CLOSE is discarded
  too, even bytes picows cannot parse (:class:`ConnectionLog`).

Subclasses implement :meth:`FramedListener.on_message`.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
import weakref
from typing import Any, TypeVar

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from imfast._core import drop_handshake, trim_write_buffer
from imfast.protocol.codes import CloseCode

__all__ = [
    "CLOSE_GRACE_SECONDS",
    "CONFORMANCE_MAX_MESSAGE",
    "ConnectionLog",
    "FramedListener",
    "frame_limited",
    "valid_close_code",
]

#: How long we wait for the peer's CLOSE reply before dropping the TCP connection.
CLOSE_GRACE_SECONDS = 2.0

#: Largest message of the conformance suites (Autobahn 9.1.6/9.2.6: 16 MiB in one frame).
CONFORMANCE_MAX_MESSAGE = 16 * 1024 * 1024

#: Ping token bucket: a burst of PING_BURST pings, refilled at PING_RATE per second.
PING_BURST = 20.0
PING_RATE = 5.0

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONT = WSMsgType.CONTINUATION
_PING = WSMsgType.PING
_PONG = WSMsgType.PONG
_CLOSE = WSMsgType.CLOSE
_DATA = (_TEXT, _BINARY, _CONT)

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def valid_close_code(code: int) -> bool:
    """Close codes a peer may send (RFC 6455 section 7.4, IANA registry)."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014:
        return True
    return 3000 <= code <= 4999


class ConnectionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows's logger for one server connection; it also answers the peer's CLOSE early.

    picows parses one frame ahead of the one it delivers.  When the peer sends
    its CLOSE and then something picows refuses (a second CLOSE: Autobahn 7.1.2;
    an oversized or malformed frame), picows would send CLOSE 1002 itself before
    handing us the peer's CLOSE, and our echo of the peer's code would be lost.
    RFC 6455 (5.5.1, 7.1.1) says what follows the peer's CLOSE is to be discarded
    and the CLOSE answered.  picows logs the parser error just *before* it sends
    its close frame, and a connection sends one close frame only: so when this
    logger sees an error while the peer's CLOSE is in and ours is not out yet, it
    sends the answer :meth:`FramedListener.on_ws_frame` would have sent, and
    picows's 1002 is not sent.  (It relies on that order in picows's parser error
    path - ``tests/conformance`` pins it: ``test_two_close_frames_*``.  If it ever
    changes, picows's 1002 goes out as before.)

    :meth:`watch` gives it the connection's transport (a weak reference: no cycle
    keeps a closed connection alive) when the upgrade request arrives, before
    any frame can.  Used in place of the child ``logging.Logger`` picows would
    otherwise create for every connection.
    """

    _transport: Any = None  # weakref.ref to the WSTransport, once watched

    def watch(self, transport: WSTransport) -> None:
        self._transport = weakref.ref(transport)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and self._transport is not None:
            transport = self._transport()
            handshake = transport.close_handshake if transport is not None else None
            if (handshake is not None and handshake.recv is not None
                    and not transport.is_close_frame_sent):
                # picows reports a CLOSE without a code as code 0 (NO_INFO): answered 1000.
                code = int(handshake.recv.code)
                reply = code if code == 0 or valid_close_code(code) else CloseCode.PROTOCOL_ERROR
                transport.send_close(WSCloseCode(reply or CloseCode.NORMAL))
        super().log(level, msg, *args, **kwargs)


class FramedListener(WSListener):
    """Message-level WebSocket handling shared by every endpoint."""

    __slots__ = ("_frag", "_frag_size", "_frag_text", "_utf8", "closed", "max_message",
                 "ping_tokens", "ping_ts", "raw", "transport")

    def __init__(self, max_message: int) -> None:
        self.transport: Any = None
        self.raw: Any = None
        self.closed = False
        self._frag: list[bytes] | None = None
        self._frag_text = False
        self._frag_size = 0
        self._utf8: Any = None  # incremental UTF-8 decoder of a fragmented text message
        self.max_message = max_message
        self.ping_tokens = PING_BURST
        self.ping_ts = 0.0

    # Subclass hooks -------------------------------------------------------
    def on_message(self, payload: bytes, is_text: bool, validated: bool) -> None:
        """One complete message; ``validated`` is True if its UTF-8 was checked."""
        raise TypeError(f"{type(self).__name__} must override on_message")

    def on_activity(self) -> None:
        """Any frame arrived (heartbeat bookkeeping)."""

    def now(self) -> float:
        """A clock for the ping rate limit (subclasses may return a coarser one)."""
        return time.monotonic()

    # picows callbacks -----------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.raw = transport.underlying_transport
        # ~2 KB less per idle connection: we write our frames to ``raw`` ourselves, and
        # read what we need from the upgrade request before the connection starts.
        trim_write_buffer(transport)
        drop_handshake(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.closed or transport.is_close_frame_sent:
            # A close frame went out: we wait for the peer's CLOSE (RFC 6455 7.1.1) and
            # discard the rest.  Closing TCP earlier would make the kernel answer the peer's
            # in-flight data with RST, which can destroy our close frame on its side.
            # picows parses one frame ahead: when that one is bad it sends the close frame
            # itself, then still hands us the frame before it - which must not be answered.
            self.closed = True
            if frame.msg_type is _CLOSE:
                _close_tcp(transport)
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
                # The fast path: one frame, one message.
                self.on_message(frame.get_payload_as_bytes(), msg_type is _TEXT, False)
                return
            self._frag_text = msg_type is _TEXT
            self._frag_size = 0
            self._frag = []
            self._utf8 = _utf8_decoder() if self._frag_text else None
            self._add_fragment(frame)
        elif msg_type is _CONT:
            if self._frag is None:
                self.fail(CloseCode.PROTOCOL_ERROR, "continuation frame with no message started")
                return
            if not self._add_fragment(frame) or not frame.fin:
                return
            payload = b"".join(self._frag)
            utf8 = self._utf8
            self._frag = None
            self._utf8 = None
            if utf8 is not None:
                try:
                    utf8.decode(b"", True)  # a code point cut off at the end
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
        """Buffer one fragment; False if the connection was failed instead."""
        self._frag_size += frame.payload_size
        if self._frag_size > self.max_message:
            self._frag = None
            self._utf8 = None
            self.fail(CloseCode.TOO_BIG, "fragmented message over the size limit")
            return False
        chunk = frame.get_payload_as_bytes()
        if self._utf8 is not None:
            # Fail fast (Autobahn 6.4.x): an invalid sequence is refused in the fragment
            # that completes it, not when the message ends.  Linear in the message size.
            try:
                self._utf8.decode(chunk)
            except UnicodeDecodeError:
                self._frag = None
                self._utf8 = None
                self.fail(CloseCode.INVALID_PAYLOAD, "text message is not valid UTF-8")
                return False
        assert self._frag is not None
        self._frag.append(chunk)
        return True

    def _ping_allowed(self) -> bool:
        now = self.now()
        self.ping_tokens = min(PING_BURST, self.ping_tokens + (now - self.ping_ts) * PING_RATE)
        self.ping_ts = now
        if self.ping_tokens < 1.0:
            return False
        self.ping_tokens -= 1.0
        return True

    def _on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # picows has already refused a 1-byte payload, codes below 3000 outside its
        # WSCloseCode table and a reason that is not UTF-8 (with 1002/1007): what is
        # left to check is 0 and 1006 (in that table, never sent on the wire) and >= 5000.
        size = frame.payload_size
        if size == 0:
            reply = int(CloseCode.NORMAL)
        else:
            code: int = frame.get_close_code().value
            reply = code if size >= 2 and valid_close_code(code) else int(CloseCode.PROTOCOL_ERROR)
        self.closed = True
        transport.send_close(WSCloseCode(reply))
        # The server closes the TCP connection first (RFC 6455 7.1.1).
        _close_tcp(transport)

    # Helpers for subclasses -----------------------------------------------
    def fail(self, code: int, reason: str) -> None:
        """Close the connection with ``code``: close frame, then disconnect."""
        if self.closed:
            return
        self.closed = True
        self._frag = None
        self._utf8 = None
        transport = self.transport
        if transport is not None:
            # At most 123 bytes of reason fit in a control frame; never cut a code point.
            message = reason.encode()[:120].decode("utf-8", "ignore").encode()
            transport.send_close(WSCloseCode(int(code)), message)
            handshake = transport.close_handshake
            if handshake is not None and handshake.recv is not None:
                # Failing on the peer's own CLOSE (e.g. one with RSV bits): no reply to wait for.
                _close_tcp(transport)
            else:
                # Disconnect when the peer's CLOSE arrives (on_ws_frame), or after a grace period.
                asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, _drop, transport)


def _close_tcp(transport: WSTransport) -> None:
    """Close TCP after what is queued is sent - unless the peer does not read it."""
    unsent = transport.underlying_transport.get_write_buffer_size()
    transport.disconnect()
    if unsent:
        # A graceful close waits for the buffer to drain, so a peer that stopped reading
        # would keep the connection (and the buffer) forever.
        asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, _drop, transport)


def _drop(transport: WSTransport) -> None:
    """End of the grace period: close TCP now, discarding what the peer did not read."""
    transport.disconnect(False)


_L = TypeVar("_L", bound=FramedListener)
_limited: dict[type, type] = {}


def frame_limited(cls: type[_L]) -> type[_L]:
    """A subclass of ``cls`` that refuses data frames over ``max_message`` itself (1009).

    picows applies one ``max_frame_size`` to the whole server and refuses bigger
    frames as soon as their header arrives.  A server whose ``max_frame_size`` is
    raised for one endpoint (the conformance echo takes 16 MiB messages) serves
    the other endpoints' listeners through this class, so their limit holds;
    their oversized frames are then buffered before being refused, which is why
    it is not the default.  Same class for the same ``cls``.
    """
    sub = _limited.get(cls)
    if sub is None:
        base_on_frame = cls.on_ws_frame

        def on_ws_frame(self: FramedListener, transport: WSTransport, frame: WSFrame) -> None:
            if (frame.payload_size > self.max_message and not self.closed
                    and frame.msg_type in _DATA):
                self.on_activity()
                self.fail(CloseCode.TOO_BIG, "frame over the size limit")
                return
            base_on_frame(self, transport, frame)

        sub = type(f"FrameLimited{cls.__name__}", (cls,), {
            "__slots__": (), "__module__": cls.__module__, "on_ws_frame": on_ws_frame,
            "__doc__": f"{cls.__name__} refusing data frames over max_message (1009).",
        })
        _limited[cls] = sub
    return sub
