"""The Store contract (imfast/backends/base.py), run on every implementation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from imfast.backends.base import StoredMessage, sync_twin

DAY = 24 * 3600


def msg(conv: str, seq: int, cmid: str = "", sender: str = "alice", body: str = "b") -> StoredMessage:
    return StoredMessage(conv, seq, f"id{conv}{seq}", sender, "d1", cmid, body, 1000 + seq)


async def test_reserve_is_sequential_and_deduplicated(store: Any) -> None:
    r1 = await store.reserve("p:a:b", "a:c1", "m1", 0)
    r2 = await store.reserve("p:a:b", "a:c2", "m2", 0)
    other = await store.reserve("g:team", "a:c3", "m3", 0)
    assert (r1.seq, r2.seq, other.seq) == (1, 2, 1)
    again = await store.reserve("p:a:b", "a:c1", "m-retry", 0)
    assert again.duplicate and (again.seq, again.msg_id) == (1, "m1")
    assert (await store.reserve("p:a:b", "a:c4", "m4", 0)).seq == 3


async def test_the_synchronous_twins_are_the_same_steps(store: Any) -> None:
    """SyncFastPath: reserve_now/advance_now/mark_read_now share the coroutines' state."""
    twins = (sync_twin(store, "reserve"), sync_twin(store, "advance"),
             sync_twin(store, "mark_read"))
    if None in twins:
        # Stores over network backends have none (each step awaits Redis/MySQL): then
        # none may be offered, so the router keeps the coroutines for every step.
        assert twins == (None, None, None), "some synchronous twins without the others"
        assert type(store).__name__ == "CompositeStore", "only network-backed stores lack twins"
        return
    r1 = store.reserve_now("p:a:b", "a:c1", "m1", 0)
    r2 = await store.reserve("p:a:b", "a:c2", "m2", 0)
    assert (r1.seq, r2.seq) == (1, 2) and not r1.duplicate
    assert (await store.reserve("p:a:b", "a:c1", "x", 0)).msg_id == "m1"  # one dedup memory
    again = store.reserve_now("p:a:b", "a:c2", "y", 0)
    assert again.duplicate and (again.seq, again.msg_id) == (2, "m2")
    assert store.reserve_now("p:a:b", "k", "m", 41).seq == 42  # the floor too
    assert store.advance_now("u", "d", "p:a:b", 2) == 2
    assert await store.advance("u", "d", "p:a:b", 1) == 2
    assert store.advance_now("u", "d", "p:a:b", 1) == 2
    assert (await store.cursors("u", "d")) == {"p:a:b": 2}
    # A move nobody is told the answer of: the same step, answered with a lower bound.
    assert store.advance_blind_now("u", "d", "p:a:b", 1) >= 1
    assert store.advance_now("u", "d", "p:a:b", 0) == 2  # it never moved back
    assert store.mark_read_now("p:a:b", "u", 2) is True
    assert await store.mark_read("p:a:b", "u", 2) is False  # one receipt: not moved again
    assert store.mark_read_now("p:a:b", "u", 1) is False  # never back
    assert (await store.read_up_to("p:a:b")) == {"u": 2}
    # A device's own entries: its cursor steps onto each right above it and stops at
    # the first entry it never got, in the same cursor state as advance.
    assert store.advance_own_now("u", "d", "p:a:b", [3, 4, 6, 7]) == 4  # never got 5
    assert store.advance_own_now("u", "d", "p:a:b", [2, 3]) == 4  # never back
    assert await store.advance("u", "d", "p:a:b", 1) == 4
    assert store.advance_own_now("u", "d", "p:a:b", [4, 5]) == 5
    assert store.advance_own_now("u", "d2", "p:a:b", [1, 2]) == 2  # a new device's first
    assert store.advance_own_now("u", "d3", "p:a:b", [2]) == 0  # it never got seq 1
    assert (await store.cursors("u", "d")) == {"p:a:b": 5}
    assert (await store.cursors("u", "d3")) == {}


async def test_reserve_respects_the_floor(store: Any) -> None:
    r = await store.reserve("p:a:b", "k1", "m1", 41)
    assert r.seq == 42


async def test_release_allows_retry_and_reuses_the_unstored_seq(store: Any) -> None:
    await store.append([msg("p:a:b", 1)])
    r = await store.reserve("p:a:b", "a:lost", "m", 0)
    assert r.seq == 2
    await store.release("p:a:b", "a:lost")
    retry = await store.reserve("p:a:b", "a:lost", "m2", 0)
    assert not retry.duplicate


async def test_append_fetch_and_pages(store: Any) -> None:
    await store.append([msg("p:a:b", i) for i in range(1, 11)])
    assert [m.seq for m in await store.fetch("p:a:b", 0, 3)] == [1, 2, 3]
    assert [m.seq for m in await store.fetch("p:a:b", 8, 100)] == [9, 10]
    assert [m.seq for m in await store.fetch_before("p:a:b", 5, 2)] == [3, 4]
    assert await store.latest_seq("p:a:b") == 10 and await store.latest_seq("p:x:y") == 0
    got = await store.get("p:a:b", 7)
    assert got == msg("p:a:b", 7) and await store.get("p:a:b", 11) is None


async def test_append_refuses_an_existing_seq_atomically(store: Any) -> None:
    await store.append([msg("p:a:b", 1)])
    with pytest.raises(ValueError, match="sequence number already exists"):
        await store.append([msg("p:a:b", 2), msg("p:a:b", 1)])
    assert await store.latest_seq("p:a:b") == 1


async def test_durable_dedup_and_private_index(store: Any) -> None:
    await store.append([msg("p:a:b", 1, cmid="c1", sender="a")])
    found = await store.find_by_cmid("a", "c1")
    assert found is not None and found.seq == 1
    assert await store.find_by_cmid("b", "c1") is None
    assert await store.private_conversations("a") == {"p:a:b": 1}
    assert await store.private_conversations("b") == {"p:a:b": 1}
    assert await store.private_conversations("c") == {}


async def test_cursors_only_move_forward(store: Any) -> None:
    assert await store.advance("u", "d", "p:a:b", 5) == 5
    assert await store.advance("u", "d", "p:a:b", 3) == 5
    assert await store.cursors("u", "d") == {"p:a:b": 5}
    assert await store.cursors("u", "other") == {}


async def test_groups(store: Any) -> None:
    assert await store.create("g1", "owner", "Group One")
    assert not await store.create("g1", "x", "again")
    assert await store.info("g1") == ("Group One", "owner")
    await store.set_member("g1", "bob", "member")
    await store.set_member("g1", "bob", "admin")
    assert await store.members("g1") == {"owner": "owner", "bob": "admin"}
    assert await store.groups_of("bob") == ["g1"]
    assert await store.remove_member("g1", "bob")
    assert not await store.remove_member("g1", "bob")
    assert await store.groups_of("bob") == []


async def test_group_bars_keep_removed_users_and_everyone_out_of_invite_only_groups(
        store: Any) -> None:
    assert await store.create("open1", "owner", "Open")
    assert not await store.barred("open1", "bob")
    await store.bar("open1", "bob")
    await store.bar("open1", "bob")  # twice: still one bar
    assert await store.barred("open1", "bob") and not await store.barred("open1", "carol")
    assert not await store.barred("other", "bob")  # per group
    await store.unbar("open1", "bob")
    await store.unbar("open1", "bob")  # none left: nothing happens
    assert not await store.barred("open1", "bob")
    assert await store.create("closed1", "owner", "Closed", False)
    assert await store.barred("closed1", "bob") and await store.barred("closed1", "carol")
    await store.unbar("closed1", "bob")  # lifts bob's own bar only: everyone stays barred
    assert await store.barred("closed1", "bob")
    # A create that fails (id taken) bars nobody.
    assert not await store.create("open1", "x", "again", False)
    assert not await store.barred("open1", "carol")


async def test_receipts_only_move_forward(store: Any) -> None:
    assert await store.mark_read("p:a:b", "a", 3)
    assert not await store.mark_read("p:a:b", "a", 2)
    assert not await store.mark_read("p:a:b", "a", 3)
    assert await store.read_up_to("p:a:b") == {"a": 3}


async def test_registry(registry: Any) -> None:
    await registry.register("u", "phone", "gw1")
    await registry.register("u", "web", "gw2")
    assert await registry.lookup("u") == {"phone": "gw1", "web": "gw2"}
    await registry.unregister("u", "phone", "gw-other")  # stale owner: ignored
    assert await registry.lookup("u") == {"phone": "gw1", "web": "gw2"}
    await registry.unregister("u", "phone", "gw1")
    assert await registry.lookup("u") == {"web": "gw2"}


async def test_repair_moves_the_counter_past_the_floor(store: Any) -> None:
    await store.reserve("p:a:b", "k1", "m1", 0)
    await store.repair("p:a:b", 10)
    assert (await store.reserve("p:a:b", "k2", "m2", 0)).seq == 11


async def test_retention_deletes_old_entries_and_never_hands_a_seq_out_twice(
        store: Any) -> None:
    """purge_messages (MESSAGE_RETENTION_DAYS): the old entries go, in batches; each
    conversation keeps its highest seq, so the next entry still gets the next seq,
    and the private-conversation index and cursors stay."""
    now = int(time.time() * 1000)

    def aged(conv: str, seq: int, days: float) -> StoredMessage:
        return StoredMessage(conv, seq, f"id-{conv}-{seq}", "a", "d1", f"{conv}-{seq}", "b",
                             now - int(days * DAY * 1000))

    await store.append([aged("p:a:b", s, 40) for s in range(1, 6)]
                       + [aged("g:old", s, 31) for s in range(1, 4)]
                       + [aged("p:a:c", s, 35) for s in range(1, 3)]
                       + [aged("p:a:b", 6, 1), aged("p:a:b", 7, 0)])
    await store.advance("b", "d1", "p:a:b", 2)
    if hasattr(store, "settle"):  # SQLite: in the table, where retention looks
        await store.settle()
    assert await store.purge_messages(30 * DAY, batch=3) == 10
    assert [m.seq for m in await store.fetch("p:a:b", 0, 10)] == [6, 7]
    assert await store.fetch("g:old", 0, 10) == []
    assert await store.fetch("p:a:c", 0, 10) == []
    assert await store.latest_seq("g:old") == 3 and await store.latest_seq("p:a:b") == 7
    assert await store.private_conversations("a") == {"p:a:b": 7, "p:a:c": 2}
    assert (await store.cursors("b", "d1"))["p:a:b"] == 2
    # The next entry of an emptied conversation follows the deleted ones.
    assert (await store.reserve("g:old", "a:new", "id-new", 0)).seq == 4
    assert await store.purge_messages(30 * DAY) == 0
    for bad in ({"older_than_seconds": 0}, {"older_than_seconds": DAY, "batch": 0}):
        with pytest.raises(ValueError):
            await store.purge_messages(**bad)
