"""A gateway's fan-out of group_msg records to the other gateways (GatewayNode)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from imfast.config import Settings
from imfast.gateway.cluster import GatewayNode
from imfast.gateway.metrics import GatewayStats
from imfast.link.endpoints import LinkPool
from tests.helpers.push_links import RecordingGateway, until


class _Gateway:
    """What _fan_out_groups reads of the local gateway: its registry cache and table."""

    advertise = "unix:/nonexistent/self.sock"

    def __init__(self, where: dict[str, str]) -> None:
        self.where = where
        self.registry = self
        self.table = self
        self.users = 0
        self.delivered: list[Any] = []
        self.stats = GatewayStats()

    def cached_lookup(self, user: str) -> dict[str, str]:
        return {"phone": self.where[user]}

    def deliver(self, users: list[str], entry: Any, skip: Any) -> None:
        self.delivered.append(users)


async def test_an_unreachable_gateway_does_not_hold_up_the_others(tmp_path) -> None:
    alive = await RecordingGateway(str(tmp_path / "alive.sock")).listen()
    dead = RecordingGateway(str(tmp_path / "dead.sock"))  # nothing listens there
    node = GatewayNode(Settings(kafka_brokers=("k:9092",), etcd_endpoints=("http://e:2379",)))
    gateway = node.gateway = _Gateway(  # type: ignore[assignment]
        {"a": dead.addr, "a2": dead.addr, "b": alive.addr})
    node.links = LinkPool(timeout=0.5, on_dropped=node._fan_out_dropped)
    await node.links.get(alive.addr).connection()
    entry = ["g:team", 1, "m1", "s", "d", "c", "hi", 0, "msg"]
    # "a" (on the dead gateway) comes first; "b"'s push goes at once all the same.
    handled = asyncio.ensure_future(node._fan_out_groups(
        [(b"g:team", orjson.dumps({"e": entry, "u": ["a", "b", "a2"]}))]))
    await until(lambda: alive.got == [1])
    assert not handled.done() and gateway.stats.failed == 0
    # The batch (and so its Kafka offsets) is done once the dead gateway is given up
    # on: both members there count as failed deliveries (they get it at resume).
    await asyncio.wait_for(handled, 5.0)
    assert gateway.stats.failed == 2
    await node.links.close()
