"""The router's group-members cache: bounded in members, and never left holding a
membership read that raced a change."""

from __future__ import annotations

import asyncio

from imfast.backends.memory import MemoryStore
from imfast.config import load_settings
from imfast.service.members import MembersCache
from imfast.service.router import Router
from tests.helpers.pushers import RecordingPusher


def test_beyond_the_limit_the_groups_cached_longest_ago_go_first() -> None:
    cache = MembersCache(limit=4)
    cache.put("a", {"u1": "owner", "u2": "member"}, cache.reading())
    cache.put("b", {"u1": "owner", "u3": "member"}, cache.reading())
    assert cache.size == 4 and set(cache) == {"a", "b"}
    cache.put("c", {"u4": "owner"}, cache.reading())
    assert set(cache) == {"b", "c"} and cache.size == 3
    cache.put("b", {"u1": "owner"}, cache.reading())  # replaced: counted once
    assert cache.size == 2 and cache.get("b") == {"u1": "owner"}
    cache.forget("c")
    assert set(cache) == {"b"} and cache.size == 1


def test_one_group_larger_than_the_limit_is_still_cached_alone() -> None:
    cache = MembersCache(limit=1)
    cache.put("big", {"u1": "owner", "u2": "member"}, cache.reading())
    assert set(cache) == {"big"}


def test_a_read_that_raced_a_change_is_not_cached() -> None:
    cache = MembersCache()
    token = cache.reading()
    cache.forget("other")  # any change while the read was under way
    cache.put("g", {"u1": "owner"}, token)
    assert "g" not in cache
    cache.put("g", {"u1": "owner"}, cache.reading())
    assert "g" in cache


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
