"""The fault proxy itself (tests/harness/faultproxy.py), against an echo server.

Timing assertions are lower bounds only (a delay or a cap can make things
slower, never faster), so a busy machine cannot make them fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.harness.faultproxy import FaultProxy, ProxyThread


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass  # reset by a test, or torn down with the loop
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with FaultProxy(("127.0.0.1", server.sockets[0].getsockname()[1])) as p:
        yield p
    server.close()


async def connect(p: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", p.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    data: bytes, timeout: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    assert await roundtrip(r, w, b"hello") == b"hello"
    big = bytes(range(256)) * 4096  # 1 MiB, several chunks
    assert await roundtrip(r, w, big) == big
    w.close()


async def test_delay_applies_each_way_then_passes_again(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    proxy.delay(200)
    began = time.monotonic()
    assert await roundtrip(r, w, b"slow") == b"slow"
    assert time.monotonic() - began >= 0.39  # 200 ms there, 200 ms back
    proxy.pass_through()
    assert await roundtrip(r, w, b"fast") == b"fast"  # same connection, intact
    w.close()


async def test_bandwidth_cap(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    proxy.bandwidth(20_000)
    began = time.monotonic()
    data = b"x" * 30_000
    assert await roundtrip(r, w, data) == data
    # The legs overlap (the echo starts with the first slice); the first ~50 ms slice
    # is free: >= 29 kB / 20 kB/s.
    assert time.monotonic() - began >= 1.4
    w.close()


async def test_blackhole_swallows_then_new_connections_pass(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    assert await roundtrip(r, w, b"before") == b"before"
    proxy.blackhole()
    with pytest.raises(TimeoutError):
        await roundtrip(r, w, b"lost", timeout=0.5)
    r2, w2 = await connect(proxy)  # accepted ...
    with pytest.raises(TimeoutError):
        await roundtrip(r2, w2, b"into the void", timeout=0.5)  # ... and never answered
    assert proxy.swallowed >= len(b"lost") + len(b"into the void")
    proxy.pass_through()
    r3, w3 = await connect(proxy)
    assert await roundtrip(r3, w3, b"after") == b"after"
    for writer in (w, w2, w3):
        writer.close()


async def test_reset_kills_open_and_new_connections(proxy: FaultProxy) -> None:
    r, w = await connect(proxy)
    assert await roundtrip(r, w, b"up") == b"up"
    proxy.reset()
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await roundtrip(r, w, b"gone")
    r2, w2 = await connect(proxy)
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await roundtrip(r2, w2, b"refused")
    assert proxy.connections == 0
    proxy.pass_through()
    r3, w3 = await connect(proxy)
    assert await roundtrip(r3, w3, b"back") == b"back"
    for writer in (w, w2, w3):
        writer.close()


def test_proxy_thread_switches_modes_from_another_thread() -> None:
    """A module-scoped cluster uses proxies on a loop that outlives each test's loop."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as upstream, ProxyThread() as proxies:
        p = proxies.start(FaultProxy(("127.0.0.1", upstream.getsockname()[1])))
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as client:
            conn, _ = upstream.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            p.reset()  # from this (non-loop) thread
            conn.settimeout(5)
            with pytest.raises(ConnectionResetError):
                while conn.recv(4):
                    pass
            conn.close()
