"""Router.send_now / ack_now: the synchronous path of an embedded store promises what
submit_send / ack promise (durable before answered, order, dedup, gapless undo)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from imfast.backends.base import Reservation, StoredMessage, sync_twin, variant_of
from imfast.backends.composite import CompositeStore
from imfast.backends.memory import MemoryStore
from imfast.backends.sqlite import SQLiteStore
from imfast.backends.sqlite_log import read_segment
from imfast.config import load_settings
from imfast.protocol.codes import ImfastError
from imfast.service.remote import _result_from_wire, serve_router
from imfast.service.router import Router, SendResult
from tests.helpers.pushers import RecordingPusher


class _OwnReserve(MemoryStore):
    """Overrides the coroutine only: the inherited reserve_now is not its twin."""

    async def reserve(self, conv: str, dedup_key: str, msg_id: str, floor: int) -> Reservation:
        return await super().reserve(conv, dedup_key, msg_id, floor)


class _FailingAppend(MemoryStore):
    """Refuses the first ``failures`` appends (a full disk)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def append(self, messages: list[StoredMessage]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        await super().append(messages)


class _Replies:
    """Collects what send_now's reply callbacks were told, in call order."""

    def __init__(self) -> None:
        self.got: list[tuple[SendResult | None, BaseException | None]] = []
        self.done = asyncio.Event()
        self.expected = 0

    def __call__(self, result: SendResult | None, exc: BaseException | None) -> None:
        self.got.append((result, exc))
        if len(self.got) >= self.expected:
            self.done.set()

    async def wait(self, n: int) -> None:
        self.expected = n
        if len(self.got) < n:
            await asyncio.wait_for(self.done.wait(), 5)


async def test_the_twin_is_used_only_where_it_is_the_same_step(tmp_path: Path) -> None:
    memory = MemoryStore()
    assert sync_twin(memory, "reserve") == memory.reserve_now
    sqlite_store = SQLiteStore(str(tmp_path / "t.db"))
    assert sync_twin(sqlite_store, "advance") == sqlite_store.advance_now
    await sqlite_store.close()
    assert sync_twin(_OwnReserve(), "reserve") is None  # overridden coroutine
    assert sync_twin(_OwnReserve(), "advance") is not None  # advance is not overridden
    patched = MemoryStore()

    async def reserve(*args: Any) -> Reservation:
        raise AssertionError

    patched.reserve = reserve  # type: ignore[method-assign]
    assert sync_twin(patched, "reserve") is None  # replaced on the instance
    # A composite's sequences come from another object than its log: no twin.
    assert sync_twin(CompositeStore(MemoryStore(), MemoryStore()), "reserve") is None
    assert Router(load_settings({}), _OwnReserve(), RecordingPusher())._reserve_now is None


async def test_send_now_answers_only_once_durable_and_in_seq_order(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    store = SQLiteStore(path)
    pusher = RecordingPusher()
    router = Router(load_settings({}), store, pusher)
    reader = sqlite3.connect(path)  # another connection sees committed rows only
    durable_when_answered: list[bool] = []

    replies = _Replies()

    def on_disk(conv: str, seq: int) -> bool:
        """In the table, or in an entry-log segment file (what a restart moves in)."""
        row = reader.execute("SELECT COUNT(*) FROM messages WHERE conv=? AND seq=?",
                             (conv, seq)).fetchone()
        logged = [r[:2] for seg in sorted(Path(path + "-log").glob("*.seg"))
                  for r in read_segment(seg)[0]]
        return row[0] == 1 or (conv, seq) in logged

    def reply(result: SendResult | None, exc: BaseException | None) -> None:
        assert result is not None
        durable_when_answered.append(on_disk(result.conv, result.seq))
        replies(result, exc)

    for i in range(6):
        user, to = ("alice", "bob") if i % 2 else ("bob", "alice")
        assert router.send_now(user, "d1", f"c{i}", to, f"m{i}", reply)
    assert replies.got == []  # nothing is answered before it is stored
    await replies.wait(6)
    assert [r.seq for r, _ in replies.got if r is not None] == [1, 2, 3, 4, 5, 6]
    assert durable_when_answered == [True] * 6
    assert pusher.order == [("p:alice:bob", seq) for seq in range(1, 7)]
    assert router.sent_total == 6 and router._inflight == {}
    reader.close()
    await store.close()


async def test_send_now_leaves_retries_and_duplicates_to_submit_send() -> None:
    store = MemoryStore()
    router = Router(load_settings({}), store, RecordingPusher())
    replies = _Replies()
    assert router.send_now("alice", "d1", "same", "bob", "once", replies)
    # A retry while the first is being stored: declined, nothing reserved.
    assert not router.send_now("alice", "d1", "same", "bob", "once", replies)
    retry = asyncio.ensure_future(router.send("alice", "d1", "same", "bob", None, "once"))
    await replies.wait(1)
    first = replies.got[0][0]
    assert first is not None and not first.duplicate
    again = await retry  # waited for the first attempt, then answered as its duplicate
    assert again.duplicate and (again.msg_id, again.seq) == (first.msg_id, first.seq)
    # Once stored: still declined (a duplicate is answered from the log by submit_send).
    assert not router.send_now("alice", "d1", "same", "bob", "once", replies)
    assert [m.seq for m in await store.fetch("p:alice:bob", 0, 10)] == [1]
    assert (await router.send("alice", "d1", "next", "bob", None, "x")).seq == 2


async def test_send_now_declines_while_a_reservation_of_the_conversation_is_under_way() -> None:
    router = Router(load_settings({}), MemoryStore(), RecordingPusher())
    router._conv_turns["p:alice:bob"] = asyncio.get_running_loop().create_future()
    assert not router.send_now("alice", "d1", "c1", "bob", "x", _Replies())
    assert router.send_now("alice", "d1", "c1", "carol", "x", _Replies())


async def test_send_group_now_takes_a_group_send_only_with_its_members_cached() -> None:
    store = MemoryStore()
    pusher = RecordingPusher()
    router = Router(load_settings({}), store, pusher)
    await router.group_create("owner", "d0", "team", "Team", ["alice"])
    router._members_cache.clear()  # as after a restart: members need a read
    replies = _Replies()
    assert not router.send_group_now("alice", "d1", "g0", "team", "x", replies)
    assert (await router.send("alice", "d1", "g0", None, "team", "x")).seq == 2  # loads them
    assert router.send_group_now("alice", "d1", "g1", "team", "y", replies)
    await replies.wait(1)
    result, exc = replies.got[0]
    assert exc is None and result is not None and (result.conv, result.seq) == ("g:team", 3)
    assert pusher.order[-2:] == [("g:team", 2), ("g:team", 3)]
    # A non-member is refused in the call, as submit_send refuses it.
    with pytest.raises(ImfastError) as refused:
        router.send_group_now("mallory", "d1", "g2", "team", "z", replies)
    assert (refused.value.code, refused.value.field) == ("forbidden", "group")
    # A retry of a cmid being stored and a switched-off feature go to the coroutine.
    assert router.send_group_now("alice", "d1", "g3", "team", "w", replies)
    assert not router.send_group_now("alice", "d1", "g3", "team", "w", replies)
    off = Router(load_settings({"FEATURES_DISABLED": "groups"}), store, RecordingPusher())
    off._members_cache["team"] = {"alice": "member"}
    assert not off.send_group_now("alice", "d1", "g4", "team", "v", _Replies())
    await replies.wait(2)
    assert [m.cmid for m in await store.fetch("g:team", 1, 10)] == ["g0", "g1", "g3"]


async def test_the_link_takes_a_group_send_in_the_call_that_read_it() -> None:
    """serve_router's hot path (what a gateway process's group send reaches)."""
    router = Router(load_settings({}), MemoryStore(), RecordingPusher())
    await router.group_create("owner", "d0", "team", "Team", ["alice"])
    now = serve_router(router).now  # type: ignore[attr-defined]
    answers: list[tuple[Any, BaseException | None]] = []
    done = asyncio.Event()

    def answer(result: Any, exc: BaseException | None) -> None:
        answers.append((result, exc))
        done.set()

    assert now("send", ["alice", "d1", "l1", None, "team", "hi"], answer)
    await asyncio.wait_for(done.wait(), 5)
    result = _result_from_wire(answers[0][0])
    assert answers[0][1] is None and (result.conv, result.seq) == ("g:team", 2)
    with pytest.raises(ImfastError) as refused:  # the link answers it as the task path would
        now("send", ["mallory", "d1", "l2", None, "team", "x"], answer)
    assert refused.value.code == "forbidden"
    router._members_cache.clear()
    assert not now("send", ["alice", "d1", "l3", None, "team", "y"], answer)  # needs a read


async def test_a_refused_append_answers_unavailable_and_the_retry_takes_the_same_seq() -> None:
    store = _FailingAppend(failures=1)
    router = Router(load_settings({}), store, RecordingPusher())
    replies = _Replies()
    assert router.send_now("alice", "d1", "c1", "bob", "x", replies)
    await replies.wait(1)
    result, exc = replies.got[0]
    assert result is None and isinstance(exc, ImfastError) and exc.code == "unavailable"
    await asyncio.sleep(0)  # the release task runs
    assert router.send_now("alice", "d1", "c1", "bob", "x", replies)
    await replies.wait(2)
    retried = replies.got[1][0]
    assert retried is not None and retried.seq == 1 and not retried.duplicate
    assert [m.cmid for m in await store.fetch("p:alice:bob", 0, 10)] == ["c1"]


async def test_ack_now_moves_the_cursor_as_ack_does_and_leaves_the_rest_to_ack() -> None:
    store = MemoryStore()
    router = Router(load_settings({}), store, RecordingPusher())
    for i in range(3):
        await router.send("alice", "d1", f"c{i}", "bob", None, "x")
    assert router.ack_now("bob", "d1", "p:alice:bob", 2) == 2
    assert router.ack_now("bob", "d1", "p:alice:bob", 1) == 2  # never back
    assert await store.cursors("bob", "d1") == {"p:alice:bob": 2}
    assert router.ack_now("bob", "d1", "p:alice:bob", 4) is None  # beyond the log: ack says so
    assert router.ack_now("carol", "d1", "p:alice:bob", 1) is None  # not a member
    assert router.ack_now("bob", "d1", "g:team", 1) is None  # no cached membership
    assert router.ack_now("bob", "d1", "nonsense", 1) is None
    assert await store.cursors("carol", "d1") == {}


async def test_an_ack_nobody_is_told_the_cursor_of_may_move_it_blind() -> None:
    class Recording(MemoryStore):
        """Counts blind moves; defines the ack steps together, as a store must."""

        def __init__(self) -> None:
            super().__init__()
            self.blind: list[int] = []

        async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
            return self.advance_now(user, device, conv, seq)

        def advance_now(self, user: str, device: str, conv: str, seq: int) -> int:
            return super().advance_now(user, device, conv, seq)

        def advance_blind_now(self, user: str, device: str, conv: str, seq: int) -> int:
            self.blind.append(seq)
            return super().advance_blind_now(user, device, conv, seq)

    store = Recording()
    router = Router(load_settings({}), store, RecordingPusher())
    for i in range(3):
        await router.send("alice", "d1", f"c{i}", "bob", None, "x")
    assert router.ack_now("bob", "d1", "p:alice:bob", 2) == 2
    assert store.blind == []  # the exact answer (an `acked` reply) reads it
    assert router.ack_now("bob", "d1", "p:alice:bob", 3, exact=False) == 3
    assert store.blind == [3]
    assert router.ack_now("bob", "d1", "p:alice:bob", 4, exact=False) is None  # checks first
    assert await store.cursors("bob", "d1") == {"p:alice:bob": 3}


def test_a_store_that_replaces_advance_now_is_never_bypassed_by_an_inherited_variant() -> None:
    class Counting(MemoryStore):
        async def advance(self, user: str, device: str, conv: str, seq: int) -> int:
            return self.advance_now(user, device, conv, seq)

        def advance_now(self, user: str, device: str, conv: str, seq: int) -> int:
            return super().advance_now(user, device, conv, seq)

    store = Counting()
    assert variant_of(store, sync_twin(store, "advance"), "advance_blind_now") is None
    plain = MemoryStore()
    assert variant_of(plain, sync_twin(plain, "advance"), "advance_blind_now") is not None
