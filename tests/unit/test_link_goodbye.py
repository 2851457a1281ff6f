"""A link closed in order says goodbye; one that broke after carrying pushes is
reported at both ends, since pushes in flight may not have arrived."""

from __future__ import annotations

import asyncio
import socket

from imfast.link import endpoints
from imfast.link.endpoints import UNIX_PREFIX, LinkClient, LinkPool, LinkServer
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


async def test_tcp_links_notice_a_dead_peer_host_within_a_minute() -> None:
    """Keepalive and a user timeout on both ends: a half-open link (the peer's host
    died, a partition) fails in ~30 s and is then treated as broken."""
    server = LinkServer(None, lambda method, args: None)
    port = await server.start("127.0.0.1", 0)
    client = LinkClient(f"127.0.0.1:{port}")
    proto = await client.connection()
    await until(lambda: len(server.connections) == 1)
    [accepted] = list(server.connections)
    for end in (proto, accepted):
        sock = end._transport.get_extra_info("socket")  # type: ignore[union-attr]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
    await client.close()
    await server.close()


async def test_names_sent_on_a_link_that_then_broke_are_sent_again(tmp_path) -> None:
    gateway = RecordingGateway(str(tmp_path / "gw.sock"))
    pool = LinkPool(timeout=0.2, users_of=lambda method, args: args)
    pool.push_soon(gateway.addr, "batch", ["carol"])  # dropped: nobody listens
    await until(lambda: pool.queued == 0)
    await gateway.listen()
    await until(lambda: gateway.resyncs == [["carol"]])
    [link] = list(gateway.server.connections)
    link._transport.abort()  # type: ignore[union-attr] - did the RESYNC arrive? unknown
    # Told again: the names (their sessions read the store now) and "anyone".
    await until(lambda: len(gateway.resyncs) == 3)
    assert sorted(gateway.resyncs, key=str) == [None, ["carol"], ["carol"]]
    await pool.close()


async def test_dropped_events_alone_need_no_resync_and_a_closing_pool_tells_who_it_can(
        tmp_path) -> None:
    gateway = RecordingGateway(str(tmp_path / "gw.sock"))
    dropped: list[str] = []
    pool = LinkPool(timeout=0.2, on_dropped=lambda addr, pushes: dropped.append(addr),
                    users_of=lambda method, args: args)
    pool.push_soon(gateway.addr, "batch", [])  # an event: nobody's entries
    await until(lambda: dropped == [gateway.addr])
    await gateway.listen()
    pool.push_soon(gateway.addr, "batch", [])  # the next push connects: no RESYNC owed
    await until(lambda: gateway.methods == ["batch"])
    # A loss noted while connected (as a break would): the closing pool still says so.
    pool._note_lost(gateway.addr, ["dave"])
    for task in list(pool._resyncers.values()):
        task.cancel()
    await pool.close()
    await until(lambda: gateway.resyncs == [["dave"]])


async def test_a_peer_owed_nothing_is_not_retried_for_ever_once_unreachable(
        tmp_path, caplog) -> None:
    """A gateway that went away for good (a pod replaced under a new address) must not
    be dialled every 2 s for the life of the process, nor kept in memory."""
    gateway = RecordingGateway(str(tmp_path / "gw.sock"))
    dropped: list[str] = []
    pool = LinkPool(timeout=0.2, on_dropped=lambda addr, pushes: dropped.append(addr),
                    users_of=lambda method, args: args)
    client = pool.get(gateway.addr)
    pool.push_soon(gateway.addr, "batch", [])  # an event: droppable, nothing owed
    await until(lambda: dropped == [gateway.addr])
    caplog.clear()
    await asyncio.sleep(0.6)  # the connect loop backs off 0.05 s doubling: it would retry
    assert "failed" not in caplog.text, "still dialling a peer owed nothing"
    assert client.protocol is None and pool.get(gateway.addr) is not client
    await gateway.listen()
    pool.push_soon(gateway.addr, "batch", [])
    await until(lambda: gateway.methods == ["batch"])
    await pool.close()


async def test_a_peer_that_said_goodbye_is_forgotten_and_reached_again_by_its_next_push(
        tmp_path) -> None:
    gateway = await RecordingGateway(str(tmp_path / "gw.sock")).listen()
    pool = LinkPool(timeout=1.0)
    first = pool.get(gateway.addr)
    pool.push_soon(gateway.addr, "batch", [])
    await until(lambda: gateway.methods == ["batch"])
    await gateway.server.close()  # in order: a BYE, nothing lost
    await until(lambda: not first.connected)
    await until(lambda: pool.get(gateway.addr) is not first)
    assert pool._lost == {}
    gateway.server = LinkServer(None, gateway._on_push)
    await gateway.listen()
    pool.push_soon(gateway.addr, "batch", [])
    await until(lambda: gateway.methods == ["batch", "batch"])
    assert gateway.resyncs == []
    await pool.close()


async def test_given_up_peers_are_remembered_up_to_a_cap_oldest_forgotten_first(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(endpoints, "GIVEN_UP_PEERS_MAX", 2)
    pool = LinkPool(timeout=0.1, patience=0.3, users_of=lambda method, args: args)
    addrs = [UNIX_PREFIX + str(tmp_path / f"gone{i}.sock") for i in range(3)]
    for addr in addrs:
        pool.push_soon(addr, "batch", ["carol"])
        await until(lambda: pool.queued == 0)
    await until(lambda: not pool._resyncers, timeout=3.0)
    assert sorted(pool._lost) == sorted(addrs[1:])  # the first given up is forgotten
    await pool.close()
