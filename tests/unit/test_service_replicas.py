"""Gateways send each conversation's new entries through one im-service replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from imfast.link.endpoints import LinkServer
from imfast.link.replicas import ServiceLinks, replica_index
from imfast.protocol.ids import group_conv, private_conv
from imfast.service.remote import RemoteRouter


def test_the_replica_of_a_key_is_the_same_in_every_process_and_spreads() -> None:
    # crc32, not hash(): Python's str hash differs between processes
    assert replica_index("p:alice:bob", 3) == replica_index("p:alice:bob", 3)
    spread = {replica_index(f"p:u{i}:v{i}", 3) for i in range(100)}
    assert spread == {0, 1, 2}


class _Replica:
    """A link server that records which calls it served."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, list[Any]]] = []
        self.server = LinkServer(self.handle)
        self.port = 0

    async def handle(self, method: str, args: list[Any]) -> Any:
        self.calls.append((method, args))
        if method == "send":
            return ["m1", "p:a:b", 1, 0, False]
        return self.name


@pytest.fixture
async def replicas() -> AsyncIterator[list[_Replica]]:
    reps = [_Replica(f"r{i}") for i in range(3)]
    for r in reps:
        r.port = await r.server.start("127.0.0.1", 0)
    yield reps
    for r in reps:
        await r.server.close()


async def test_sends_and_group_changes_go_to_the_conversations_replica(
        replicas: list[_Replica]) -> None:
    addrs = ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    links = ServiceLinks(addrs)
    await links.resolve_now()
    try:
        router = RemoteRouter(links)
        convs = [private_conv("alice", f"bob{i}") for i in range(12)]
        for i, conv in enumerate(convs):
            for _ in range(2):
                await (await router.submit_send("alice", "d", f"c{i}", f"bob{i}", None, "x"))
        await router.group_join("alice", "d", "team")
        owner_of = {f"127.0.0.1:{r.port}": r for r in replicas}
        for i, conv in enumerate(convs):
            owner = owner_of[links.order[replica_index(conv, 3)]]
            mine = [a for m, a in owner.calls if m == "send" and a[3] == f"bob{i}"]
            assert len(mine) == 2  # both sends of that conversation, on its replica
        team = owner_of[links.order[replica_index(group_conv("team"), 3)]]
        assert ("group_join", ["alice", "d", "team"]) in team.calls
        assert sum(1 for r in replicas for m, _ in r.calls if m == "send") == 24
        assert len({r.name for r in replicas if r.calls}) >= 2  # they spread
        # a call that adds no entry goes to any connected replica
        assert await router.cursors("alice", "d") in {"r0", "r1", "r2"}
    finally:
        await links.close()


async def test_a_name_resolving_to_several_addresses_is_several_replicas() -> None:
    resolved: dict[str, list[str]] = {"im-service:9094": ["10.0.0.2:9094", "10.0.0.1:9094"]}

    async def resolve(addr: str) -> list[str]:
        return resolved[addr]

    links = ServiceLinks("im-service:9094", resolve=resolve)
    changes: list[list[str]] = []
    links.on_change = lambda: changes.append(list(links.order))
    try:
        await links.resolve_now()
        assert links.order == ["10.0.0.1:9094", "10.0.0.2:9094"]  # sorted: same everywhere
        await links.resolve_now()
        assert changes == []  # the first resolution and an unchanged set are no change
        first = links.for_key("p:a:b").addr
        resolved["im-service:9094"] = ["10.0.0.1:9094", "10.0.0.2:9094", "10.0.0.3:9094"]
        await links.resolve_now()  # a scale-up
        assert links.order == ["10.0.0.1:9094", "10.0.0.2:9094", "10.0.0.3:9094"]
        assert set(links.clients) == set(links.order)
        resolved["im-service:9094"] = ["10.0.0.2:9094"]
        await links.resolve_now()  # two pods gone: their links are closed
        assert list(links.clients) == ["10.0.0.2:9094"]
        assert changes == [["10.0.0.1:9094", "10.0.0.2:9094", "10.0.0.3:9094"],
                           ["10.0.0.2:9094"]]  # the gateway distrusts pushes then
        assert links.for_key("p:a:b").addr == "10.0.0.2:9094"
        assert first in {"10.0.0.1:9094", "10.0.0.2:9094"}

        async def broken(addr: str) -> list[str]:
            raise OSError("no DNS")

        links._resolve = broken
        await links.resolve_now()  # DNS down: keep what is known
        assert links.order == ["10.0.0.2:9094"]
    finally:
        await links.close()
        await asyncio.sleep(0)


def test_an_empty_service_addr_is_refused() -> None:
    with pytest.raises(ValueError, match="SERVICE_ADDR"):
        ServiceLinks(" , ")
