"""The router's group-members cache: bounded in members, and never left holding a
membership read that raced a change."""

from __future__ import annotations

import asyncio

import pytest

from imfast.backends.memory import MemoryStore
from imfast.config import load_settings
from imfast.service.members import MembersCache
from imfast.service.router import Router
from tests.helpers.pushers import RecordingPusher


def cached(cache: MembersCache, group: str, members: dict[str, str]) -> None:
    """What the router does: a read of ``group``, answered ``members``."""
    cache.reading(group)
    cache.put(group, members)


def test_beyond_the_limit_the_groups_cached_longest_ago_go_first() -> None:
    cache = MembersCache(limit=6)  # counted: members, plus one per group
    cached(cache, "a", {"u1": "owner", "u2": "member"})
    cached(cache, "b", {"u1": "owner", "u3": "member"})
    assert cache.size == 6 and set(cache) == {"a", "b"}
    cached(cache, "c", {"u4": "owner"})
    assert set(cache) == {"b", "c"} and cache.size == 5
    cached(cache, "b", {"u1": "owner"})  # replaced: counted once
    assert cache.size == 4 and cache.get("b") == {"u1": "owner"}
    cache.forget("c")
    assert set(cache) == {"b"} and cache.size == 2


def test_groups_with_no_members_count_against_the_limit() -> None:
    """Any client can ask about group ids that do not exist; each answer (no
    members) is cached, and used to count as nothing: the cache grew for ever."""
    cache = MembersCache(limit=100)
    for i in range(10_000):
        cached(cache, f"nosuch{i}", {})
    assert len(cache) == 100 and cache.size == 100
    assert "nosuch9999" in cache and "nosuch0" not in cache  # the oldest went


def test_one_group_larger_than_the_limit_is_still_cached_alone() -> None:
    cache = MembersCache(limit=1)
    cached(cache, "big", {"u1": "owner", "u2": "member"})
    assert set(cache) == {"big"}


def test_a_read_that_raced_a_change_of_its_group_is_not_cached() -> None:
    cache = MembersCache()
    cache.reading("g")
    cache.reading("g")  # two reads under way
    cache.forget("g")  # the membership changed meanwhile
    cache.put("g", {"u1": "owner"})
    cache.put("g", {"u1": "owner"})
    assert "g" not in cache
    cached(cache, "g", {"u1": "owner"})  # a read after the change: cached
    assert "g" in cache


def test_changes_to_other_groups_do_not_stop_a_group_being_cached() -> None:
    """Under steady membership churn elsewhere a busy group must still be cached
    (a cache that any change anywhere invalidates stays empty)."""
    cache = MembersCache()
    cache.reading("busy")
    for i in range(100):
        cache.forget(f"other{i}")
    cache.put("busy", {"u1": "owner"})
    assert "busy" in cache


def test_a_failed_read_leaves_no_bookkeeping_behind() -> None:
    cache = MembersCache()
    cache.reading("g")
    cache.forget("g")
    cache.read_failed("g")
    cached(cache, "g", {"u1": "owner"})  # the change was before this read
    assert "g" in cache and cache._reads == {}


class _SlowFirstRead(MemoryStore):
    """``members`` answers its first call with what the group held when it was asked,
    after ``release`` is set: a read in flight while the membership changes."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.slow = True

    async def members(self, group: str) -> dict[str, str]:
        snapshot = await super().members(group)
        if self.slow:
            self.slow = False
            await self.release.wait()
        return snapshot


async def test_a_member_who_joined_during_a_members_read_gets_the_groups_messages() -> None:
    store = _SlowFirstRead()
    router = Router(load_settings({}), store, RecordingPusher())
    await store.create("team", "alice", "Team")
    reading = asyncio.create_task(router.group_members("team"))  # sees only alice
    await asyncio.sleep(0)
    await router.group_join("bob", "phone", "team")
    store.release.set()
    assert set(await reading) == {"alice"}  # the old answer, to the old question
    assert set(await router.group_members("team")) == {"alice", "bob"}


class _FailingRemoval(MemoryStore):
    async def remove_member(self, group: str, user: str) -> bool:
        raise ConnectionError("store away")


async def test_a_removal_the_store_refused_leaves_nobody_barred() -> None:
    store = _FailingRemoval()
    router = Router(load_settings({}), store, RecordingPusher())
    await store.create("team", "alice", "Team")
    await store.set_member("team", "bob", "member")
    with pytest.raises(ConnectionError):
        await router.group_remove("alice", "phone", "team", ["bob"])
    assert "bob" in await store.members("team") and not await store.barred("team", "bob")
