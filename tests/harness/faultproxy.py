"""A TCP fault proxy: forwards a listen port to an upstream, with switchable faults.

Put it between two components (point one at ``proxy.addr`` instead of the
other's address), then switch modes while traffic flows.  A mode applies at
once to the connections already open and to new ones:

============== ==============================================================
``pass``       forward both ways (the default)
``delay(ms)``  every chunk leaves ``ms`` later than it arrived (order kept;
               throughput is not limited); switching back does not reorder
``bandwidth``  at most ``bytes_per_s`` each way per connection; the proxy stops
               reading when its small queue is full, so senders feel TCP
               back-pressure rather than a growing proxy buffer
``blackhole``  a partition: new connections are accepted but never connected
               upstream; every byte read from either side is swallowed and
               counted.  Swallowed bytes are gone - a connection that lost
               some is as good as dead (as after a partition longer than the
               peers' TCP retransmissions), so after ``pass`` only new
               connections and those that lost nothing carry data again
``reset``      RST (``SO_LINGER`` 0) both ends of every open connection, and
               of every new one on accept, until the mode changes
============== ==============================================================

``tc netem`` would do this in the kernel, but it is not available everywhere
(and needs root); this needs neither.

The proxy runs on an asyncio loop.  Tests whose own loop lives shorter than
the proxy (a module-scoped cluster, function-scoped loops) use
:class:`ProxyThread`, which runs proxies on a loop in a daemon thread; the
mode setters are safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["FaultProxy", "Mode", "ProxyThread"]

_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 64  # per direction: bounds what the proxy holds (delay: ~4 MiB in flight)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Mode:
    """What the proxy does with bytes; see the module docstring."""

    kind: str = "pass"  # pass | delay | bandwidth | blackhole | reset
    delay_ms: float = 0.0
    bytes_per_s: float = 0.0

    def __str__(self) -> str:
        if self.kind == "delay":
            return f"delay {self.delay_ms:g} ms"
        if self.kind == "bandwidth":
            return f"bandwidth {self.bytes_per_s:g} B/s"
        return self.kind


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Connection:
    """One accepted client and (unless blackholed at accept) its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _rst(writer)
        for task in self.tasks:
            task.cancel()

    async def serve(self, client_reader: asyncio.StreamReader) -> None:
        proxy = self.proxy
        if proxy.mode.kind == "blackhole":
            await self._swallow(client_reader)
            return
        try:
            up_reader, self.upstream = await asyncio.open_connection(*proxy.upstream)
        except OSError:
            _rst(self.client)  # as the upstream's refusal would look
            return
        if proxy.mode.kind == "reset":  # switched while we connected
            self.reset()
            return
        self.tasks = [
            asyncio.ensure_future(self._direction(client_reader, self.upstream)),
            asyncio.ensure_future(self._direction(up_reader, self.client)),
        ]
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in (self.client, self.upstream):
            writer.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(_CHUNK):
                self.proxy.swallowed += len(data)
        except OSError:
            pass
        self.client.close()

    async def _direction(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """Read one side, write the other: a reader task and a writer task with a queue."""
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)

        async def read_side() -> None:
            try:
                while data := await reader.read(_CHUNK):
                    mode = proxy.mode
                    if mode.kind == "blackhole":
                        proxy.swallowed += len(data)
                        continue
                    due = loop.time() + (mode.delay_ms / 1000 if mode.kind == "delay" else 0.0)
                    await queue.put((due, data))
            except OSError:
                pass
            await queue.put((0.0, b""))  # EOF marker

        async def write_side() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                mode = proxy.mode
                if mode.kind == "blackhole":  # queued before the switch: swallowed too
                    proxy.swallowed += len(data)
                    continue
                if mode.kind != "bandwidth" or mode.bytes_per_s <= 0:
                    writer.write(data)
                    proxy.forwarded += len(data)
                    await writer.drain()
                    continue
                # Slices of ~50 ms each, each followed by its share of time.
                step = max(512, int(mode.bytes_per_s * 0.05))
                for i in range(0, len(data), step):
                    piece = data[i:i + step]
                    writer.write(piece)
                    proxy.forwarded += len(piece)
                    await writer.drain()
                    await asyncio.sleep(len(piece) / mode.bytes_per_s)

        reading = asyncio.ensure_future(read_side())
        try:
            await write_side()
        except OSError:
            pass
        finally:
            reading.cancel()


class FaultProxy:
    """Listens on ``listen_host:port`` (0: any free port) and forwards to ``upstream``."""

    def __init__(self, upstream: tuple[str, int], *, listen_host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.upstream = upstream
        self.listen_host = listen_host
        self.port = port
        self.mode = Mode()
        #: Bytes forwarded / swallowed so far (both directions).
        self.forwarded = 0
        self.swallowed = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()

    @property
    def addr(self) -> str:
        """``host:port`` to give the component that should go through the proxy."""
        return f"{self.listen_host}:{self.port}"

    async def start(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, self.listen_host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.reset()
        self._connections.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return len(self._connections)

    # -- modes (callable from any thread) -------------------------------------

    def pass_through(self) -> None:
        self._set(Mode())

    def delay(self, ms: float) -> None:
        self._set(Mode("delay", delay_ms=ms))

    def bandwidth(self, bytes_per_s: float) -> None:
        self._set(Mode("bandwidth", bytes_per_s=bytes_per_s))

    def blackhole(self) -> None:
        self._set(Mode("blackhole"))

    def reset(self) -> None:
        self._set(Mode("reset"))

    def _set(self, mode: Mode) -> None:
        loop = self._loop
        in_loop = loop is None or _running_loop() is loop
        if in_loop:
            self._apply(mode)
            return
        assert loop is not None
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def apply() -> None:
            self._apply(mode)
            done.set_result(None)

        loop.call_soon_threadsafe(apply)
        done.result(timeout=5)

    def _apply(self, mode: Mode) -> None:
        self.mode = mode
        if mode.kind == "reset":
            for conn in list(self._connections):
                conn.reset()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode.kind == "reset":
            _rst(writer)
            return
        conn = _Connection(self, writer)
        self._connections.add(conn)
        try:
            await conn.serve(reader)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(conn)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ProxyThread:
    """An event loop in a daemon thread that runs :class:`FaultProxy` instances.

    ``with ProxyThread() as proxies: p = proxies.start(FaultProxy(...))``;
    leaving the block closes every proxy and stops the loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faultproxy",
                                        daemon=True)
        self._proxies: list[FaultProxy] = []

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the proxy loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self, proxy: FaultProxy) -> FaultProxy:
        self.run(proxy.start())
        self._proxies.append(proxy)
        return proxy

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        for proxy in self._proxies:
            self.run(proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
