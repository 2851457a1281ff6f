"""A gateway's fan-out of group_msg records to the other gateways (GatewayNode)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from imfast.config import Settings
from imfast.gateway.cluster import GatewayNode


class _Gateway:
    """What _fan_out_groups reads of the local gateway: its registry cache and table."""

    advertise = "10.0.0.1:9093"

    def __init__(self, where: dict[str, str]) -> None:
        self.where = where
        self.registry = self
        self.table = self
        self.users = 0
        self.delivered: list[Any] = []

    def cached_lookup(self, user: str) -> dict[str, str]:
        return {"phone": self.where[user]}

    def deliver(self, users: list[str], entry: Any, skip: Any) -> None:
        self.delivered.append(users)


class _Links:
    """A push to ``dead`` hangs until the push to ``alive`` has gone out (or gives up),
    then fails: only concurrent pushes let it see that push."""

    def __init__(self) -> None:
        self.alive_pushed = asyncio.Event()
        self.dead_saw_alive = False

    async def push(self, address: str, method: str, items: Any) -> bool:
        if address == "dead:9093":
            try:
                await asyncio.wait_for(self.alive_pushed.wait(), 2.0)
                self.dead_saw_alive = True
            except TimeoutError:
                pass
            return False
        self.alive_pushed.set()
        return True


async def test_an_unreachable_gateway_does_not_hold_up_the_others() -> None:
    node = GatewayNode(Settings(kafka_brokers=("k:9092",), etcd_endpoints=("http://e:2379",)))
    node.gateway = _Gateway({"a": "dead:9093", "b": "alive:9093"})  # type: ignore[assignment]
    node.links = _Links()  # type: ignore[assignment]
    entry = ["g:team", 1, "m1", "s", "d", "c", "hi", 0, "msg"]
    # "a" (on the dead gateway) comes first: pushed one after another, "b" would wait.
    await node._fan_out_groups([(b"g:team", orjson.dumps({"e": entry, "u": ["a", "b"]}))])
    assert node.links.dead_saw_alive
