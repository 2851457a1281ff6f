"""The router hands a conversation's entries to the pusher in seq order, even when the
sequence store answers concurrent reservations out of order (a Redis connection pool)."""

from __future__ import annotations

import asyncio

from imfast.backends.base import Reservation, StoredMessage
from imfast.backends.memory import MemoryStore
from imfast.config import load_settings
from imfast.service.router import Router
from tests.helpers.pushers import RecordingPusher


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


async def test_concurrent_sends_to_one_conversation_are_routed_in_seq_order() -> None:
    store = _ReversingStore()
    pusher = RecordingPusher()
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
    pusher = RecordingPusher()
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


class _StuckFirstStore(MemoryStore):
    """The first reservation hangs until released (a store link that went silent)."""

    def __init__(self) -> None:
        super().__init__()
        self.unblock = asyncio.Event()
        self.calls = 0

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        self.calls += 1
        if self.calls == 1:
            await self.unblock.wait()
        return await super().reserve(conv, dedup_key, msg_id, floor)


async def test_senders_behind_a_stuck_reservation_are_told_to_retry_not_queued() -> None:
    from imfast.protocol.codes import ImfastError

    store = _StuckFirstStore()
    pusher = RecordingPusher()
    router = Router(load_settings({}), store, pusher)
    first = asyncio.ensure_future(router.send("alice", "d1", "c1", "bob", None, "1"))
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    for i in range(3):  # each gives up after _TURN_WAIT instead of waiting its turn
        started = loop.time()
        try:
            await router.send("bob", "d1", f"b{i}", "alice", None, "x")
        except ImfastError as exc:
            assert exc.code == "unavailable"
        else:
            raise AssertionError("a send overtook the stuck reservation")
        assert loop.time() - started < 5
    assert store.calls == 1  # none of them reserved: no seq can overtake the stuck one
    store.unblock.set()
    assert (await first).seq == 1
    retry = await router.send("bob", "d1", "b0", "alice", None, "x")
    assert retry.seq == 2
    assert pusher.order == [("p:alice:bob", 1), ("p:alice:bob", 2)]
    assert router._conv_turns == {}  # nothing left behind


class _LostReplyStore(MemoryStore):
    """Performs the first reservation, then loses its reply (a link that went silent)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = False

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        res = await super().reserve(conv, dedup_key, msg_id, floor)
        if not self.lost:
            self.lost = True
            raise ConnectionError("reply lost")
        return res


async def test_a_reservation_whose_reply_was_lost_does_not_block_its_cmid() -> None:
    from imfast.protocol.codes import ImfastError

    store = _LostReplyStore()
    router = Router(load_settings({}), store, RecordingPusher())
    try:
        await router.send("alice", "d1", "c1", "bob", None, "hello")
    except ConnectionError:
        pass
    else:
        raise AssertionError("the lost reply was not reported")
    for _ in range(50):  # the client retries the same cmid until it is stored
        try:
            result = await router.send("alice", "d1", "c1", "bob", None, "hello")
            break
        except ImfastError as exc:
            assert exc.code == "unavailable"
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the cmid stayed blocked by the lost reservation")
    assert not result.duplicate
    stored = await store.fetch("p:alice:bob", 0, 10)
    assert [m.cmid for m in stored] == ["c1"]  # once


class _MembersFailOnceStore(MemoryStore):
    """The first members read fails (the store out of reach), later ones answer."""

    def __init__(self) -> None:
        super().__init__()
        self.member_reads = 0

    async def members(self, group: str) -> dict[str, str]:
        self.member_reads += 1
        if self.member_reads == 1:
            raise ConnectionError("store unreachable")
        return await super().members(group)


async def test_entries_waiting_for_a_members_read_go_out_in_order_after_a_failed_read(
        ) -> None:
    """A group entry committed while its members are not cached waits for a read; the
    entries after it wait behind it (none overtakes), and a failed read is tried again."""
    store = _MembersFailOnceStore()
    await store.create("team", "alice", "Team")
    pusher = RecordingPusher()
    router = Router(load_settings({}), store, pusher)
    entries = [StoredMessage("g:team", seq, f"m{seq}", "alice", "d1", f"c{seq}", "hi", 0)
               for seq in (1, 2, 3)]
    router._route_committed(entries[:2])  # nothing cached: a read, which fails once
    router._route_committed(entries[2:])  # committed meanwhile: behind them
    assert pusher.order == []
    for _ in range(100):
        if len(pusher.order) == 3:
            break
        await asyncio.sleep(0.01)
    assert pusher.order == [("g:team", 1), ("g:team", 2), ("g:team", 3)]
    assert store.member_reads == 2 and router._late == {}
