"""A link closed in order says goodbye; one that broke after carrying pushes is
reported at both ends, since pushes in flight may not have arrived."""

from __future__ import annotations

import asyncio

from imfast.link.endpoints import LinkClient, LinkPool, LinkServer
from tests.helpers.push_links import RecordingGateway, until


async def test_a_link_that_broke_after_pushes_is_reported_one_closed_in_order_is_not(
        tmp_path) -> None:
    broken: list[str] = []
    got: list[int] = []
    server = LinkServer(None, lambda method, args: got.append(args), on_broken=broken.append)
    path = str(tmp_path / "push.sock")
    await server.start_unix(path)

    orderly = LinkClient("unix:" + path)
    (await orderly.connection()).push("batch", 1)
    await orderly.close()  # what was queued, then goodbye
    silent = LinkClient("unix:" + path)
    await silent.connection()
    await until(lambda: got == [1] and len(server.connections) == 1)
    await silent.close()  # no pushes carried: nothing could be lost
    await until(lambda: not server.connections)
    assert broken == []

    crashed = LinkClient("unix:" + path)
    proto = await crashed.connection()
    proto.push("batch", 2)
    await until(lambda: got == [1, 2])
    proto._transport.abort()  # type: ignore[union-attr] - as a crash or a reset does
    await until(lambda: broken != [])
    assert len(broken) == 1
    await crashed.close()
    await server.close()


async def test_a_pool_whose_link_broke_after_pushes_tells_the_peer_when_it_reconnects(
        tmp_path) -> None:
    gateway = await RecordingGateway(str(tmp_path / "gw.sock")).listen()
    pool = LinkPool(timeout=1.0)
    assert pool.push_soon(gateway.addr, "batch", []) is not None  # connects, then writes
    await until(lambda: gateway.methods == ["batch"])
    [link] = list(gateway.server.connections)
    link._transport.abort()  # type: ignore[union-attr] - the network reset it
    # Reconnected and told at once, naming nobody (it cannot know whose were lost).
    await until(lambda: gateway.resyncs == [None])
    assert gateway.methods == ["batch", "resync"]
    assert pool.push_soon(gateway.addr, "batch", []) is None
    await until(lambda: gateway.methods == ["batch", "resync", "batch"])
    # Closed in order by the gateway (its goodbye): nothing to tell.
    await gateway.server.close()
    await asyncio.sleep(0.2)
    await gateway.listen()
    pool.push_soon(gateway.addr, "batch", [])
    await until(lambda: gateway.methods[-1:] == ["batch"] and len(gateway.methods) == 4)
    assert gateway.resyncs == [None]
    await pool.close()
