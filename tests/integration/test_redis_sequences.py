"""RedisSequenceStore against a real Redis: key names, TTLs, data loss, races, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from imfast.backends.errors import BackendUnavailable
from imfast.backends.redis import RedisSequenceStore, dedup_key_name
from tests.harness.services import RedisServer

pytestmark = pytest.mark.integration


class DurableLog:
    """Stands in for MySQL: the highest seq stored per conversation."""

    def __init__(self) -> None:
        self.latest: dict[str, int] = {}
        self.asked: list[str] = []

    async def latest_seq(self, conv: str) -> int:
        self.asked.append(conv)
        return self.latest.get(conv, 0)


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, protocol=2, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisSequenceStore]]:
    stores: list[RedisSequenceStore] = []

    def make(log: DurableLog | None = None, url: str | None = None, **kw: Any) -> RedisSequenceStore:
        kw.setdefault("dedup_ttl", 3600)
        store = RedisSequenceStore(url or redis_server.url,
                                   floor_source=(log or DurableLog()).latest_seq, **kw)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_keys_are_the_runbook_names(raw: aioredis.Redis, make_store: Any) -> None:
    store = make_store(dedup_ttl=600)
    await store.start()
    r1 = await store.reserve("p:alice:bob", "alice:c1", "m1", 0)
    r2 = await store.reserve("p:alice:bob", "bob:c7", "m2", 0)
    g = await store.reserve("g:team", "alice:c2", "m3", 0)
    assert (r1.seq, r2.seq, g.seq) == (1, 2, 1)
    assert await raw.get("seq:private:alice:bob") == "2"  # redis-cli GET seq:private:<u1>:<u2>
    assert await raw.get("seq:group:team") == "1"
    assert store.dedup_key_name("alice:c1") == dedup_key_name("alice:c1") == "dedup:alice:c1"
    assert await raw.exists("dedup:alice:c1") == 1  # redis-cli EXISTS dedup:<id>
    assert await raw.get("dedup:alice:c1") == "p:alice:bob|1|m1"
    assert 590 <= await raw.ttl("dedup:alice:c1") <= 600
    assert 590 <= await raw.ttl("dedup:bob:c7") <= 600
    assert await raw.ttl("seq:private:alice:bob") == -1  # counters never expire
    assert sorted(await raw.keys("*")) == [
        "dedup:alice:c1", "dedup:alice:c2", "dedup:bob:c7", "seq:group:team", "seq:private:alice:bob",
    ]


async def test_duplicates_release_and_a_retried_call(raw: aioredis.Redis, make_store: Any) -> None:
    store = make_store()
    first = await store.reserve("p:a:b", "a:c1", "m1", 0)
    dup = await store.reserve("p:a:b", "a:c1", "m1-retry", 0)
    assert dup.duplicate and (dup.seq, dup.msg_id) == (first.seq, "m1")
    assert await raw.get("seq:private:a:b") == "1"  # a duplicate does not advance the counter
    # The same call again (its reply was lost): its own reservation, not a duplicate.
    again = await store.reserve("p:a:b", "a:c1", "m1", 0)
    assert (again.seq, again.msg_id, again.duplicate) == (1, "m1", False)
    # Operator's "DEL dedup:<id>" / release: the key goes, the seq is not handed out again.
    await store.release("p:a:b", "a:c1")
    assert await raw.exists("dedup:a:c1") == 0
    retry = await store.reserve("p:a:b", "a:c1", "m1b", 0)
    assert not retry.duplicate and retry.seq == 2


async def test_lost_counter_continues_above_the_durable_floor(
    raw: aioredis.Redis, make_store: Any
) -> None:
    log = DurableLog()
    store = make_store(log)
    for i in range(5):
        assert (await store.reserve("p:a:b", f"a:{i}", f"m{i}", 0)).seq == i + 1
    log.latest["p:a:b"] = 5  # all five stored in MySQL
    asked = len(log.asked)
    await raw.flushall()  # Redis lost everything
    after = await store.reserve("p:a:b", "a:new", "m-new", 0)
    assert after.seq == 6 and not after.duplicate
    assert log.asked[asked:] == ["p:a:b"] and await raw.get("seq:private:a:b") == "6"
    # The floor is consulted only while the counter is missing.
    assert (await store.reserve("p:a:b", "a:new2", "m", 0)).seq == 7
    assert len(log.asked) == asked + 1
    # Operator's "DEL seq:private:<u1>:<u2>" behaves the same: never back to 1.
    log.latest["p:a:b"] = 7
    await raw.delete("seq:private:a:b")
    assert (await store.reserve("p:a:b", "a:new3", "m", 0)).seq == 8
    # A stale (lower) floor never lowers an existing counter; a higher one raises it.
    assert (await store.reserve("p:a:b", "a:x", "m", 3)).seq == 9
    assert (await store.reserve("p:a:b", "a:y", "m", 20)).seq == 21


async def test_repair(raw: aioredis.Redis, make_store: Any) -> None:
    store = make_store()
    await store.reserve("g:team", "a:1", "m", 0)
    await store.repair("g:team", 10)
    assert await raw.get("seq:group:team") == "10"
    assert (await store.reserve("g:team", "a:2", "m", 0)).seq == 11
    await store.repair("g:team", 5)  # never lowers
    assert (await store.reserve("g:team", "a:3", "m", 0)).seq == 12
    await store.repair("g:new", 4)  # creates a missing counter
    assert (await store.reserve("g:new", "a:4", "m", 0)).seq == 5


async def test_two_instances_never_hand_out_the_same_seq(
    raw: aioredis.Redis, make_store: Any
) -> None:
    log = DurableLog()
    s1, s2 = make_store(log), make_store(log)
    t0 = time.monotonic()
    results = await asyncio.gather(*(
        (s1 if i % 2 else s2).reserve("p:a:b", f"a:{i}", f"m{i}", 0) for i in range(200)
    ))
    took = time.monotonic() - t0
    assert sorted(r.seq for r in results) == list(range(1, 201))
    assert not any(r.duplicate for r in results)
    # The same dedup key from both instances at once: exactly one winner.
    same = await asyncio.gather(*(
        (s1 if i % 2 else s2).reserve("p:a:b", "a:same", f"n{i}", 0) for i in range(20)
    ))
    assert sum(not r.duplicate for r in same) == 1
    assert {r.seq for r in same} == {201} and {r.msg_id for r in same} == {
        next(r.msg_id for r in same if not r.duplicate)
    }
    assert took < 5.0


async def test_backend_unavailable_when_redis_is_down_then_recovers_safely() -> None:
    log = DurableLog()
    with RedisServer() as server:
        store = RedisSequenceStore(server.url, dedup_ttl=60, floor_source=log.latest_seq,
                                   socket_timeout=1.0)
        try:
            await store.start()
            assert (await store.reserve("p:a:b", "a:1", "m1", 0)).seq == 1
            assert (await store.reserve("p:a:b", "a:2", "m2", 0)).seq == 2
            log.latest["p:a:b"] = 2
            server.kill()
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable, match="redis unavailable") as info:
                await store.reserve("p:a:b", "a:3", "m3", 0)
            # socket_timeout (1 s) bounds it, not a hang: 8 s of room for a loaded machine
            assert info.value.backend == "redis" and time.monotonic() - t0 < 8
            with pytest.raises(BackendUnavailable):
                await store.repair("p:a:b", 2)
            with pytest.raises(BackendUnavailable):
                await store.release("p:a:b", "a:2")
            # Restarted without persistence: no data, no cached scripts.
            server.restart()
            r = await store.reserve("p:a:b", "a:3", "m3", 0)
            assert (r.seq, r.duplicate) == (3, False)
        finally:
            await store.close()
