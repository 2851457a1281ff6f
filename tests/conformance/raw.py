"""A raw-socket WebSocket client for conformance and bad-input tests.

It builds every frame by hand (masked or not, any opcode, RSV bits, any
declared length), so it can send what a well-behaved client library refuses
to.  Server frames are read without validation and returned as they are.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Self

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


class ConnectionClosed(Exception):
    """The server closed TCP (EOF or reset)."""


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return int.from_bytes(self.payload[:2], "big") if len(self.payload) >= 2 else None

    def json(self) -> Any:
        return json.loads(self.payload)


def frame_bytes(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
                mask: bool = True, length: int | None = None) -> bytes:
    """One frame on the wire; ``length`` overrides the declared payload length."""
    n = len(payload) if length is None else length
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + mask_payload(payload, key)


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR with the repeated 4-byte key (one big-integer XOR: fast for 16 MiB too)."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little")


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


def http_exchange(port: int, request: bytes, timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Send raw bytes, read until the server closes; (status or None, whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if b"\r\n\r\n" in data and not data.startswith(b"HTTP/1.1 4") \
                        and not data.startswith(b"HTTP/1.1 5"):
                    break  # a 101: the connection stays open
        except ConnectionResetError:
            pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, data


def upgrade_request(path: str, *, key: str | None = None, version: str = "13",
                    extra: dict[str, str] | None = None, drop: tuple[str, ...] = (),
                    method: str = "GET") -> bytes:
    """A WebSocket upgrade request; ``drop`` removes headers, ``extra`` adds or replaces."""
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key if key is not None else base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": version,
    }
    headers.update(extra or {})
    lines = [f"{method} {path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWS:
    """One upgraded connection over a plain socket; see the module docstring."""

    def __init__(self, port: int, path: str, *, timeout: float = 5.0, rcvbuf: int | None = None,
                 extra: dict[str, str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = bytearray()
        self.sock.sendall(upgrade_request(path, extra=extra))
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        self.response_head = head.decode("latin-1")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            raise AssertionError(f"upgrade refused: {self.response_head}")

    # ------------------------------------------------------------------ send
    def send(self, opcode: int, payload: bytes = b"", **kw: Any) -> None:
        self.sock.sendall(frame_bytes(opcode, payload, **kw))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def text(self, data: str | bytes, **kw: Any) -> None:
        self.send(TEXT, data.encode() if isinstance(data, str) else data, **kw)

    def close_frame(self, payload: bytes = b"") -> None:
        self.send(CLOSE, payload)

    # --------------------------------------------------------------- receive
    def _fill(self, timeout: float | None = None) -> None:
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise ConnectionClosed()
        self.buf += chunk

    def _need(self, n: int, timeout: float | None) -> None:
        while len(self.buf) < n:
            self._fill(timeout)

    def recv_frame(self, timeout: float | None = 5.0) -> Frame:
        self._need(2, timeout)
        b0, b1 = self.buf[0], self.buf[1]
        n = b1 & 0x7F
        pos = 2
        if n == 126:
            self._need(4, timeout)
            n = struct.unpack_from("!H", self.buf, 2)[0]
            pos = 4
        elif n == 127:
            self._need(10, timeout)
            n = struct.unpack_from("!Q", self.buf, 2)[0]
            pos = 10
        if b1 & 0x80:
            raise AssertionError("the server masked a frame")
        self._need(pos + n, timeout)
        payload = bytes(self.buf[pos:pos + n])
        del self.buf[:pos + n]
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF, payload)

    def recv_message(self, timeout: float = 5.0) -> Frame:
        """The next data frame, skipping the server's pings."""
        while True:
            f = self.recv_frame(timeout)
            if f.opcode != PING:
                return f

    def recv_json_until(self, ftype: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        got = []
        while True:
            f = self.recv_message(timeout)
            if f.opcode == CLOSE:
                raise AssertionError(f"closed with {f.close_code} waiting for {ftype}: {got}")
            obj = f.json()
            got.append(obj)
            if obj.get("type") == ftype:
                return got

    def expect_close(self, timeout: float = 5.0, reply: bool = True) -> tuple[int | None, list[Frame]]:
        """Read up to the server's CLOSE; returns (its code, the frames before it).

        With ``reply`` the client answers with CLOSE, as RFC 6455 asks.
        """
        before = []
        while True:
            f = self.recv_frame(timeout)
            if f.opcode == CLOSE:
                if reply:
                    try:
                        self.close_frame(f.payload[:2])
                    except OSError:
                        pass
                return f.close_code, before
            before.append(f)

    def closed_by_server(self, timeout: float = 2.0) -> bool:
        """True if the server closes TCP within ``timeout`` (any data is discarded)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                self._fill(max(0.01, end - time.monotonic()))
            except ConnectionClosed:
                return True
            except TimeoutError:
                return False
            self.buf.clear()
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
