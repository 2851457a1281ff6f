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
