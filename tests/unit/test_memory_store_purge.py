"""MemoryStore (``--data-dir :memory:``) retention leaves nothing of a deleted entry
behind but its conversation's seq floor: no reservation, no empty log."""

from __future__ import annotations

import time

from imfast.backends.base import StoredMessage
from imfast.backends.memory import MemoryStore

DAY = 24 * 3600


async def _stored(store: MemoryStore, seq: int, cmid: str, days_old: float) -> None:
    """As the router stores one: reserve (under sender:cmid, or the msg_id), append."""
    msg_id = f"m{seq}"
    key = f"alice:{cmid}" if cmid else msg_id
    assert (await store.reserve("g:team", key, msg_id, 0)).seq == seq
    ts = int((time.time() - days_old * DAY) * 1000)
    await store.append([StoredMessage("g:team", seq, msg_id, "alice", "d", cmid, "b", ts)])


async def test_purge_drops_every_reservation_and_the_emptied_log() -> None:
    store = MemoryStore()
    await _stored(store, 1, "c1", 40)
    await _stored(store, 2, "", 40)  # an event: reserved under its msg_id
    assert await store.purge_messages(30 * DAY) == 2
    assert store._dedup == {} and store._by_dedup == {}
    assert "g:team" not in store._logs
    assert await store.latest_seq("g:team") == 2  # the floor
    assert (await store.reserve("g:team", "alice:c1", "m3", 0)).seq == 3  # stored anew


async def test_purge_keeps_the_reservations_of_what_it_keeps() -> None:
    store = MemoryStore()
    await _stored(store, 1, "", 40)
    await _stored(store, 2, "c2", 0)
    assert await store.purge_messages(30 * DAY) == 1
    assert list(store._dedup) == ["alice:c2"]
    again = await store.reserve("g:team", "alice:c2", "m9", 0)
    assert again.duplicate and again.seq == 2
