"""ClusterPusher: Kafka records kept while the broker is down and published in order;
pushes to gateways (real link servers on Unix sockets) that never wait for one."""

from __future__ import annotations

import asyncio

import orjson

from imfast.backends.base import StoredMessage
from imfast.backends.errors import BackendUnavailable
from imfast.link import endpoints
from imfast.link.endpoints import LinkPool
from imfast.service import pusher as pusher_module
from imfast.service.pusher import TOPIC_GROUP, ClusterPusher
from tests.helpers.push_links import RecordingGateway as Gateway
from tests.helpers.push_links import until


class NoDevices:
    def cached_lookup(self, user: str) -> dict[str, str]:
        return {}


class FlakyBus:
    """Refuses every publish while ``down``; records what it accepted."""

    def __init__(self) -> None:
        self.down = True
        self.attempts = 0
        self.published: list[tuple[str, bytes]] = []

    async def publish_many(self, topic: str, items: list[tuple[bytes, bytes]]) -> None:
        self.attempts += 1
        if self.down:
            raise BackendUnavailable("kafka", "broker down")
        self.published += [(topic, value) for _, value in items]


def entry(seq: int) -> StoredMessage:
    return StoredMessage("g:team", seq, f"m{seq}", "alice", "phone", f"c{seq}", str(seq), 0)


async def test_records_are_spooled_while_the_broker_is_down_then_published_in_order(
        monkeypatch) -> None:
    monkeypatch.setattr(pusher_module, "SPOOL_RETRY", 0.01)
    bus = FlakyBus()
    pusher = ClusterPusher(NoDevices(), bus, LinkPool())
    for seq in range(1, 4):
        pusher.deliver(["bob"], entry(seq), None)
    await pusher.routed_all()  # the first attempt failed: held, not dropped
    assert pusher.spooled == 3 and bus.published == []
    attempts = bus.attempts
    for seq in range(4, 6):  # the broker is known to be down: straight to the spool
        pusher.deliver(["bob"], entry(seq), None)
        await pusher.routed_all()
    assert pusher.spooled == 5
    bus.down = False
    for _ in range(200):
        if not pusher.spooled:
            break
        await asyncio.sleep(0.01)
    assert bus.attempts > attempts
    seqs = [orjson.loads(v)["e"][1] for topic, v in bus.published if topic == TOPIC_GROUP]
    assert seqs == [1, 2, 3, 4, 5]
    pusher.deliver(["bob"], entry(6), None)  # spool empty again: published directly
    await pusher.routed_all()
    assert [orjson.loads(v)["e"][1] for _, v in bus.published][-1] == 6


class Where:
    """The registry cache: bob on ``gw1``, anyone else on ``gw2``."""

    def __init__(self, gw1: Gateway, gw2: Gateway) -> None:
        self.gw1, self.gw2 = gw1, gw2

    def cached_lookup(self, user: str) -> dict[str, str]:
        return {"phone": (self.gw1 if user == "bob" else self.gw2).addr}


def private(seq: int) -> StoredMessage:
    return StoredMessage("p:alice:bob", seq, f"m{seq}", "alice", "phone", f"c{seq}", "x", 0)


async def two_gateways(tmp_path, listening: bool = True, timeout: float = 5.0,
                       patience: float = 60.0) -> tuple[Gateway, Gateway, LinkPool]:
    """gw1 listening and connected; gw2 listening (and connected) only if ``listening``;
    a pool giving up on pushes to a peer after ``timeout`` s, on the peer after
    ``patience`` s."""
    gw1 = await Gateway(str(tmp_path / "gw1.sock")).listen()
    gw2 = Gateway(str(tmp_path / "gw2.sock"))
    pool = LinkPool(timeout=timeout, patience=patience)
    await pool.get(gw1.addr).connection()
    if listening:
        await gw2.listen()
        await pool.get(gw2.addr).connection()
    return gw1, gw2, pool


async def test_routed_all_waits_for_its_round_not_for_a_flush_that_never_runs_dry(
        tmp_path) -> None:
    gw1, gw2, pool = await two_gateways(tmp_path)
    # With a bus, rounds are tasks; publishing (the broker is down: spooled) awaits.
    pusher = ClusterPusher(Where(gw1, gw2), FlakyBus(), pool)
    stop = False

    async def steady_load() -> None:  # something new to route every iteration
        seq = 100
        while not stop:
            seq += 1
            pusher.deliver(["bob"], private(seq), None)
            pusher.deliver(["bob"], entry(seq), None)  # a group entry: a publish
            await asyncio.sleep(0)

    load = asyncio.create_task(steady_load())
    try:
        await asyncio.sleep(0.01)
        pusher.deliver(["bob"], private(1), None)
        await asyncio.wait_for(pusher.routed_all(), 1.0)  # used to wait for a lull
        assert pusher._flushing is not None and not pusher._flushing.done()  # still busy
        await until(lambda: 1 in gw1.got)  # done meant handed to gw1's link
    finally:
        stop = True
        await load
        await pool.close()
    await asyncio.wait_for(pusher.routed_all(), 1.0)


async def test_without_a_bus_a_round_is_one_callback_and_routed_all_waits_for_it(
        tmp_path) -> None:
    gw1, gw2, pool = await two_gateways(tmp_path)
    pusher = ClusterPusher(Where(gw1, gw2), None, pool)
    pusher.deliver(["bob"], private(1), None)
    pusher.deliver(["bob"], private(2), None)
    routed = pusher.routed_all()
    assert not routed.done()  # the round runs at the loop iteration's end
    await asyncio.sleep(0)
    assert pusher._flushing is None  # no task was needed
    await asyncio.wait_for(routed, 1.0)
    assert pusher.routed_all().done()  # nothing queued: nothing to wait for
    await until(lambda: gw1.got == [1, 2])
    await pool.close()


async def test_a_gateway_not_connected_holds_up_nobody_and_gets_its_pushes_in_order(
        tmp_path) -> None:
    """A gateway (worker) restarting: the connected gateway is served at once, and
    rounds after it are not held up; the restarting one gets its entries in routing
    order once it listens again, and only then are the senders of entries for it
    answered (a crash before would leave them unacknowledged: resent, not lost)."""
    gw1, gw2, pool = await two_gateways(tmp_path, listening=False)
    for bus in (None, FlakyBus()):  # the embedded rounds, then the distributed ones
        pusher = ClusterPusher(Where(gw1, gw2), bus, pool)
        base = 10 if bus is None else 20
        pusher.deliver(["carol"], private(base + 1), None)  # gw2: not listening
        pusher.deliver(["bob"], private(base + 2), None)
        held = pusher.routed_all()
        await until(lambda: base + 2 in gw1.got)  # noqa: B023 - awaited here
        pusher.deliver(["bob"], private(base + 3), None)  # a later round, gw1 only
        await asyncio.wait_for(pusher.routed_all(), 1.0)
        await until(lambda: base + 3 in gw1.got)  # noqa: B023 - awaited here
        pusher.deliver(["carol"], private(base + 4), None)  # queued behind base + 1
        await until(lambda: pool.queued == (2 if bus is None else 4))  # noqa: B023
        assert not held.done() and pusher.route_failures == 0
    await gw2.listen()
    await asyncio.wait_for(held, 5.0)
    await until(lambda: gw2.got == [11, 14, 21, 24])
    pusher.deliver(["carol"], private(25), None)  # connected now: straight through
    await until(lambda: gw2.got[-1] == 25)
    assert pool.queued == 0
    await pool.close()


async def test_pushes_to_a_gateway_unreachable_for_the_timeout_are_dropped_and_counted(
        tmp_path) -> None:
    gw1, gw2, pool = await two_gateways(tmp_path, listening=False, timeout=0.2)
    pusher = ClusterPusher(Where(gw1, gw2), None, pool)
    pusher.deliver(["carol"], private(1), None)
    pusher.deliver(["bob"], private(2), None)
    await asyncio.wait_for(pusher.routed_all(), 2.0)  # answered once given up on
    assert pusher.route_failures == 1
    assert pool.queued == 0 and gw1.got == [2]
    # Once it is reachable, the gateway is told whose pushes it lost, at once: a
    # conversation with no later entry must not wait for one.
    await gw2.listen()
    await until(lambda: gw2.resyncs == [["carol"]])
    assert gw2.methods == ["resync"]
    pusher.deliver(["carol"], private(3), None)
    await asyncio.wait_for(pusher.routed_all(), 2.0)
    await until(lambda: gw2.got == [3])
    pusher.deliver(["carol"], private(4), None)  # told once
    await until(lambda: gw2.got == [3, 4])
    assert gw2.methods == ["resync", "batch", "batch"] and gw1.methods == ["batch"]
    await pool.close()


async def test_a_resync_names_every_user_of_the_lost_pushes_but_events_and_at_most_a_cap(
        tmp_path, monkeypatch) -> None:
    gw1, gw2, pool = await two_gateways(tmp_path, listening=False, timeout=0.2)
    pusher = ClusterPusher(Where(gw1, gw2), None, pool)
    pusher.deliver(["carol", "dave"], private(1), None)
    pusher.event(["erin"], {"type": "typing"}, None)  # droppable: nobody to resync
    await asyncio.wait_for(pusher.routed_all(), 2.0)
    await until(lambda: pool.queued == 0)
    await gw2.listen()
    await until(lambda: gw2.resyncs == [["carol", "dave"]])
    # More users than a RESYNC may name: it names none (every session checks).
    monkeypatch.setattr(endpoints, "RESYNC_USERS_MAX", 1)
    gw3 = Gateway(str(tmp_path / "gw3.sock"))
    pool.push_soon(gw3.addr, "batch", [["deliver", {"e": [], "u": ["x", "y"], "s": None}]])
    await until(lambda: pool.queued == 0, timeout=2.0)
    await gw3.listen()
    await until(lambda: gw3.resyncs == [None])
    await pool.close()


async def test_a_peer_unreachable_past_the_patience_is_given_up_then_told_if_it_returns(
        tmp_path, caplog) -> None:
    gw1, gw2, pool = await two_gateways(tmp_path, listening=False, timeout=0.2,
                                        patience=0.6)
    client = pool.get(gw2.addr)
    pusher = ClusterPusher(Where(gw1, gw2), None, pool)
    pusher.deliver(["carol"], private(1), None)
    await asyncio.wait_for(pusher.routed_all(), 2.0)
    await until(lambda: "given up after" in caplog.text, timeout=3.0)
    connects = client.connects
    await gw2.listen()
    await asyncio.sleep(0.5)  # no connect attempts any more: nothing reaches it
    assert client.connects == connects and gw2.methods == []
    pusher.deliver(["carol"], private(2), None)  # it is back: told first, naming none
    await asyncio.wait_for(pusher.routed_all(), 2.0)
    await until(lambda: gw2.got == [2])
    assert gw2.methods == ["resync", "batch"] and gw2.resyncs == [None]
    await pool.close()
