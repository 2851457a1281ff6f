"""The router hands a conversation's entries to the pusher in seq order, even when the
sequence store answers concurrent reservations out of order (a Redis connection pool)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from imfast.backends.base import Reservation, StoredMessage
from imfast.backends.memory import MemoryStore
from imfast.config import load_settings
from imfast.service.router import Router


class _ReversingStore(MemoryStore):
    """Answers each reservation later than the one after it (if it gets the chance)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        res = await super().reserve(conv, dedup_key, msg_id, floor)
        self.calls += 1
        await asyncio.sleep(0.05 if res.seq % 2 else 0.0)  # odd seqs come back last
        return res


class _RecordingPusher:
    def __init__(self) -> None:
        self.order: list[tuple[str, int]] = []

    def deliver(self, users: Iterable[str], message: StoredMessage,
                skip: tuple[str, str] | None) -> None:
        self.order.append((message.conv, message.seq))

    def event(self, users: Iterable[str], payload: dict[str, Any],
              skip: tuple[str, str] | None) -> None:
        pass


async def test_concurrent_sends_to_one_conversation_are_routed_in_seq_order() -> None:
    store = _ReversingStore()
    pusher = _RecordingPusher()
    router = Router(load_settings({}), store, pusher)
    results = await asyncio.gather(*(
        router.send("alice" if i % 2 else "bob", "d1", f"c{i}", "bob" if i % 2 else "alice",
                    None, f"hello {i}")
        for i in range(8)))
    assert sorted(r.seq for r in results) == list(range(1, 9))
    assert store.calls == 8
    assert pusher.order == [("p:alice:bob", seq) for seq in range(1, 9)]


async def test_other_conversations_do_not_wait_for_a_slow_one() -> None:
    store = _ReversingStore()
    pusher = _RecordingPusher()
    router = Router(load_settings({}), store, pusher)
    # seq 1 of alice:bob is slow (odd); carol:dave's seq 2 need not wait for it
    slow = asyncio.ensure_future(router.send("alice", "d1", "a1", "bob", None, "x"))
    await router.send("carol", "d1", "c1", "dave", None, "y")  # its seq 1 is slow too
    fast = await router.send("carol", "d1", "c2", "dave", None, "z")
    assert fast.seq == 2
    assert not slow.done() or slow.result().seq == 1
    await slow
    assert [o for o in pusher.order if o[0] == "p:carol:dave"] == [("p:carol:dave", 1),
                                                                     ("p:carol:dave", 2)]
