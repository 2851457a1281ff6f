"""An embedded imfast node in a background thread, for tests that use real sockets.

The node runs on its own uvloop loop, on port 0 (a free port), with its data in
a temporary directory, exactly as ``imfast serve`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import uvloop
import websocket

from imfast.auth import mint_token
from imfast.config import Settings
from imfast.node import EmbeddedNode


class NodeThread:
    """Start/stop an :class:`EmbeddedNode` in a thread; see module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node: EmbeddedNode | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> NodeThread:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = uvloop.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            try:
                self.node = EmbeddedNode(self.settings)
                self.port = loop.run_until_complete(self.node.start())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.node.stop())
            loop.close()
            self._stopped.set()

        self._stopped.clear()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the node's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def restart(self) -> None:
        """Stop and start again on the same port and data dir."""
        port = self.port
        self.stop()
        self.settings = self.settings.replace(http_port=port)
        self.start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user: str, device: str = "default", ttl: float = 3600) -> str:
        return mint_token(self.settings, user, device, ttl)

    def http(self, path: str) -> tuple[int, Any]:
        """GET ``path``; returns (status, parsed JSON or text)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                body = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            status = exc.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body


class Client:
    """A blocking test client (websocket-client) that speaks protocol v1."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 5.0) -> None:
        full = f"{url}?token={token}" if token else url
        self.ws = websocket.create_connection(full, timeout=timeout)
        self.frames: list[dict[str, Any]] = []

    def send(self, **frame: Any) -> None:
        self.ws.send(json.dumps(frame))

    def recv(self) -> dict[str, Any]:
        frame = json.loads(self.ws.recv())
        self.frames.append(frame)
        return frame  # type: ignore[no-any-return]

    def recv_until(self, ftype: str, limit: int = 10_000, **match: Any) -> list[dict[str, Any]]:
        """Frames up to and including the first of type ``ftype`` matching ``match``."""
        got = []
        for _ in range(limit):
            frame = self.recv()
            got.append(frame)
            if frame.get("type") == ftype and all(frame.get(k) == v for k, v in match.items()):
                return got
        raise AssertionError(f"no {ftype} frame within {limit} frames: {got[-5:]}")

    def welcome(self) -> dict[str, Any]:
        """Read frames until the resume finished; returns the welcome frame."""
        frames = self.recv_until("resumed")
        return frames[0]

    def close(self) -> None:
        self.ws.close()


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until true (or fail after ``timeout``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def expect_close(client: Client, max_frames: int = 50) -> tuple[int, list[dict[str, Any]]]:
    """Read until the server's close frame; returns (close code, frames before it)."""
    frames = []
    for _ in range(max_frames):
        opcode, data = client.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big"), frames
        if opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(json.loads(data))
    raise AssertionError(f"no close frame: {frames[-5:]}")
