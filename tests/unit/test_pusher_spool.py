"""ClusterPusher keeps Kafka records while the broker is down and publishes them in order."""

from __future__ import annotations

import asyncio

import orjson

from imfast.backends.base import StoredMessage
from imfast.backends.errors import BackendUnavailable
from imfast.link.endpoints import LinkPool
from imfast.service import pusher as pusher_module
from imfast.service.pusher import TOPIC_GROUP, ClusterPusher


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


class SlowLinks:
    """Gateway pushes that take a loop iteration or two, like a busy socket."""

    def __init__(self) -> None:
        self.pushed: list[int] = []

    async def push(self, gateway: str, method: str, items: list) -> bool:
        await asyncio.sleep(0.001)
        self.pushed += [item[1]["e"][1] for item in items]
        return True


class OneGateway:
    def cached_lookup(self, user: str) -> dict[str, str]:
        return {"phone": "gw1:9093"}


async def test_routed_all_waits_for_its_round_not_for_a_flush_that_never_runs_dry() -> None:
    links = SlowLinks()
    # With a bus, rounds are tasks (the embedded, bus-less rounds are tested below).
    pusher = ClusterPusher(OneGateway(), FlakyBus(), links)  # type: ignore[arg-type]
    stop = False

    async def steady_load() -> None:  # something new to route every iteration
        seq = 100
        while not stop:
            seq += 1
            pusher.deliver(["bob"], StoredMessage("p:alice:bob", seq, f"m{seq}", "alice",
                                                  "phone", f"c{seq}", "x", 0), None)
            await asyncio.sleep(0)

    load = asyncio.create_task(steady_load())
    try:
        await asyncio.sleep(0.01)
        pusher.deliver(["bob"], StoredMessage("p:alice:bob", 1, "m1", "alice", "phone", "c1",
                                              "x", 0), None)
        await asyncio.wait_for(pusher.routed_all(), 1.0)  # used to wait for a lull
        assert 1 in links.pushed  # done means pushed
        assert pusher._flushing is not None and not pusher._flushing.done()  # still busy
    finally:
        stop = True
        await load
    await asyncio.wait_for(pusher.routed_all(), 1.0)


class Client:
    """One worker's link: ``push`` is refused while it is not ``connected``."""

    def __init__(self, connected: bool) -> None:
        self.connected = connected
        self.pushed: list[int] = []

    def push(self, method: str, items: list) -> bool:
        if not self.connected:
            return False
        self.pushed += [item[1]["e"][1] for item in items]
        return True


class Workers:
    """LinkPool's surface for two gateway workers; ``gw2`` connects when pushed async."""

    def __init__(self) -> None:
        self.clients = {"gw1": Client(True), "gw2": Client(False)}

    def get(self, gateway: str) -> Client:
        return self.clients[gateway]

    async def push(self, gateway: str, method: str, items: list) -> bool:
        await asyncio.sleep(0.001)  # connecting
        client = self.clients[gateway]
        client.connected = True
        return client.push(method, items)


class TwoGateways:
    def cached_lookup(self, user: str) -> dict[str, str]:
        return {"phone": "gw1" if user == "bob" else "gw2"}


def private(seq: int) -> StoredMessage:
    return StoredMessage("p:alice:bob", seq, f"m{seq}", "alice", "phone", f"c{seq}", "x", 0)


async def test_without_a_bus_a_round_is_one_callback_and_routed_all_waits_for_it() -> None:
    links = Workers()
    pusher = ClusterPusher(TwoGateways(), None, links)  # type: ignore[arg-type]
    pusher.deliver(["bob"], private(1), None)
    pusher.deliver(["bob"], private(2), None)
    routed = pusher.routed_all()
    assert not routed.done() and links.clients["gw1"].pushed == []  # at the iteration's end
    await asyncio.sleep(0)
    assert links.clients["gw1"].pushed == [1, 2]
    assert pusher._flushing is None  # no task was needed
    await asyncio.wait_for(routed, 1.0)
    assert pusher.routed_all().done()  # nothing queued: nothing to wait for


async def test_without_a_bus_a_worker_not_connected_is_pushed_in_order_before_answering() -> None:
    links = Workers()
    pusher = ClusterPusher(TwoGateways(), None, links)  # type: ignore[arg-type]
    pusher.deliver(["carol"], private(1), None)  # gw2: not connected yet
    pusher.deliver(["bob"], private(2), None)
    routed = pusher.routed_all()
    await asyncio.sleep(0)
    assert links.clients["gw1"].pushed == [2]  # the connected worker is not held up
    assert not routed.done()  # its sender waits for gw2's push too
    pusher.deliver(["carol"], private(3), None)  # routed while gw2 connects: after 1
    await asyncio.wait_for(routed, 1.0)
    await asyncio.wait_for(pusher.routed_all(), 1.0)
    assert links.clients["gw2"].pushed == [1, 3]
