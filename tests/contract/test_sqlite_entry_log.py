"""The SQLite store's entry log (imfast/backends/sqlite_log.py): appends go to a
segment file and a hot index first, a thread moves them into the table.

What must hold: every read answers alike before, during and after the move;
a crash leaves segments that the next open moves in (a torn tail cut off);
a failed move is retried and loses nothing; the loop's own writes never wait
for the mover's lock on the loop; appends wait once the mover is far behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imfast.backends import sqlite as sqlite_module
from imfast.backends.base import StoredMessage
from imfast.backends.sqlite import SQLiteStore
from imfast.backends.sqlite_log import LogMover, encode, read_segment
from tests.contract.test_sqlite_store import _reads


def _msg(conv: str, seq: int, sender: str = "alice") -> StoredMessage:
    return StoredMessage(conv, seq, f"m{conv}{seq}", sender, "d1", f"c{conv}{seq}",
                         f"body {seq}", 1000 + seq)


def _table(path: str) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT conv, seq FROM messages ORDER BY conv, seq").fetchall()


def _segments(path: str) -> list[Path]:
    return sorted(Path(path + "-log").glob("*.seg"))


async def _answers(store: SQLiteStore) -> dict[str, Any]:
    conv = "p:alice:bob"
    return {
        "all": [m.seq for m in await store.fetch(conv, 0, 100)],
        "page": [m.seq for m in await store.fetch(conv, 3, 4)],
        "before": [m.seq for m in await store.fetch_before(conv, 8, 4)],
        "before_all": [m.seq for m in await store.fetch_before(conv, 100, 100)],
        "get": [(await store.get(conv, s)) for s in (2, 9, 11)],
        "cmid": [(await store.find_by_cmid("alice", f"c{conv}{s}")) for s in (1, 10)],
        "latest": await store.latest_seq(conv),
        "private": (await store.private_conversations("alice"),
                    await store.private_conversations("bob")),
        "dup": (await store.reserve(conv, f"alice:c{conv}7", "x", 0)),
    }


async def test_reads_answer_alike_while_entries_are_hot_and_after_the_move(
        tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    store = SQLiteStore(path)
    conv = "p:alice:bob"
    await store.append([_msg(conv, s) for s in range(1, 6)])
    await store.settle()
    assert _table(path) == [(conv, s) for s in range(1, 6)]
    await store.append([_msg(conv, s) for s in range(6, 11)])
    await store.append([_msg("g:team", 1, sender="bob")])
    assert _table(path) == [(conv, s) for s in range(1, 6)]  # 6-10 are hot only
    assert len(_segments(path)) == 1
    split = await _answers(store)  # half in the table, half in the hot index
    assert split["all"] == list(range(1, 11))
    assert split["page"] == [4, 5, 6, 7]
    assert split["before"] == [4, 5, 6, 7]
    assert split["before_all"] == list(range(1, 11))
    assert [m and m.seq for m in split["get"]] == [2, 9, None]
    assert [m and m.seq for m in split["cmid"]] == [1, 10]
    assert split["latest"] == 10
    assert split["private"] == ({conv: 10}, {conv: 10})
    assert split["dup"].duplicate and split["dup"].seq == 7
    with pytest.raises(ValueError, match="already exists"):  # in the table
        await store.append([_msg(conv, 11), _msg(conv, 3)])
    with pytest.raises(ValueError, match="already exists"):  # hot
        await store.append([_msg(conv, 11), _msg(conv, 8)])
    with pytest.raises(ValueError, match="already exists"):  # twice in one batch
        await store.append([_msg(conv, 11), _msg(conv, 11)])
    await store.settle()
    assert _table(path) == [("g:team", 1)] + [(conv, s) for s in range(1, 11)]
    assert _segments(path) == []
    assert store._hot == {} and store._hot_dedup == {} and store._hot_pairs == {}
    assert await _answers(store) == split  # moved: the same answers from the table
    await store.close()


async def test_a_crash_leaves_segments_that_the_next_open_moves_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "crash.db")
    monkeypatch.setattr(sqlite_module, "_MOVE_EVERY", 3600.0)  # nothing moves on its own
    crashed = SQLiteStore(path)
    conv = "p:alice:bob"
    await crashed.append([_msg(conv, s) for s in (1, 2, 3)])
    await crashed.append([_msg(conv, 4)])
    assert _table(path) == []  # acknowledged, only in the segment
    (segment,) = _segments(path)
    torn = encode([("p:alice:bob", 5, "m", "alice", "d1", "c5", "b", 1, "msg", "k")])[:-3]
    segment.write_bytes(segment.read_bytes() + torn)  # a power cut in the next write
    # No close(): the next process opens the same file.
    with caplog.at_level(logging.WARNING, logger="imfast.store"):
        reopened = SQLiteStore(path)
    assert any("interrupted write" in r.getMessage() for r in caplog.records)
    assert _table(path) == [(conv, s) for s in (1, 2, 3, 4)]  # moved in before any read
    assert _segments(path) == []
    assert [m.seq for m in await reopened.fetch(conv, 0, 10)] == [1, 2, 3, 4]
    assert (await reopened.reserve(conv, f"alice:c{conv}2", "x", 0)).duplicate
    assert (await reopened.reserve(conv, "alice:new", "y", 0)).seq == 5  # 5 was never stored
    assert await reopened.private_conversations("bob") == {conv: 4}
    await reopened.close()


def test_a_segment_reads_back_whole_records_only(tmp_path: Path) -> None:
    rows = [("c", i, "m", "s", "d", "k", "b" * i, i, "msg", None) for i in range(1, 4)]
    data = encode(rows)
    seg = tmp_path / "1.seg"
    seg.write_bytes(data)
    assert read_segment(seg) == (rows, len(data), 0)
    corrupt = bytearray(data)
    corrupt[-2] ^= 0xFF  # the last record's payload no longer matches its CRC
    seg.write_bytes(bytes(corrupt))
    got, good, torn = read_segment(seg)
    assert got == rows[:2] and good + torn == len(data) and torn > 0


async def test_a_failed_move_is_retried_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_move = LogMover._move
    calls: list[int] = []

    def flaky_move(self: LogMover, db: sqlite3.Connection, seg: Any) -> None:
        calls.append(len(seg.rows))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_move(self, db, seg)

    monkeypatch.setattr(LogMover, "_move", flaky_move)
    path = str(tmp_path / "retry.db")
    store = SQLiteStore(path)
    store._mover.retry_after = 0.01
    await store.append([_msg("p:alice:bob", s) for s in (1, 2)])
    await store.settle()
    assert calls == [2, 2] and store._mover.failures == 1
    assert _table(path) == [("p:alice:bob", 1), ("p:alice:bob", 2)]
    await store.close()


async def test_the_loops_writes_never_wait_on_the_loop_while_another_connection_writes(
        tmp_path: Path) -> None:
    path = str(tmp_path / "lock.db")
    store = SQLiteStore(path)
    await store.append([_msg("p:alice:bob", 1)])
    await store.settle()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # as the mover does during a chunk
    create = asyncio.create_task(store.create("g1", "alice", "G"))
    assert await store.advance("bob", "d1", "p:alice:bob", 1) == 1
    ticks = 0
    for _ in range(40):  # the loop keeps running: the write waits as a task, not a call
        await asyncio.sleep(sqlite_module._FLUSH_DELAY / 10)
        ticks += 1
    assert ticks == 40 and not create.done()
    assert holder.execute("SELECT COUNT(*) FROM cursors").fetchone() == (0,)  # deferred
    # Handed to the mover, which waits for the lock: still read from memory meanwhile.
    assert store._writing and not store._cursor_dirty
    assert await store.cursors("bob", "d1") == {"p:alice:bob": 1}
    assert store.advance_now("bob", "d1", "p:alice:bob", 0) == 1  # never back
    assert await store.mark_read("p:alice:bob", "bob", 1)
    await asyncio.sleep(sqlite_module._FLUSH_DELAY * 1.5)
    assert len(store._writing) == 1  # one write at a time: the receipt waits for it
    assert await store.read_up_to("p:alice:bob") == {"bob": 1}
    assert not await store.mark_read("p:alice:bob", "bob", 1)
    holder.execute("COMMIT")
    assert await create is True
    for _ in range(100):
        await asyncio.sleep(sqlite_module._WRITE_RETRY)
        if holder.execute("SELECT seq FROM cursors").fetchall() == [(1,)]:
            break
    assert holder.execute("SELECT seq FROM cursors").fetchall() == [(1,)]
    for _ in range(100):  # the receipt's write follows the cursor's
        await asyncio.sleep(sqlite_module._WRITE_RETRY)
        if holder.execute("SELECT user, seq FROM read_receipts").fetchall() and \
                not store._writing:
            break
    assert holder.execute("SELECT user, seq FROM read_receipts").fetchall() == [("bob", 1)]
    assert store._writing == []
    assert await store.members("g1") == {"alice": "owner"}
    holder.close()
    await store.close()


async def test_appends_wait_once_the_mover_is_far_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sqlite_module, "_MAX_BEHIND", 2)
    path = str(tmp_path / "behind.db")
    store = SQLiteStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the mover cannot commit
    for seq in (1, 2):
        await store.append([_msg("p:alice:bob", seq)])
        store._roll()
    third = asyncio.create_task(store.append([_msg("p:alice:bob", 3)]))
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert not third.done()  # two segments wait: the third append waits with them
    assert any("wait for the mover" in r.getMessage() for r in caplog.records)  # said once
    holder.execute("COMMIT")
    await third
    await store.settle()
    assert _table(path) == [("p:alice:bob", s) for s in (1, 2, 3)]
    holder.close()
    await store.close()


async def test_the_segments_the_mover_has_not_moved_are_counted(tmp_path: Path) -> None:
    """``segments_waiting`` (``store_segments_waiting`` in /stats, the
    ``im_store_log_segments_waiting`` gauge) counts what the mover still has to move."""
    path = str(tmp_path / "backlog.db")
    store = SQLiteStore(path)
    assert store.segments_waiting == 0
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the mover cannot commit
    for seq in (1, 2, 3):
        await store.append([_msg("p:alice:bob", seq)])
        store._roll()
    await asyncio.sleep(0.05)
    assert store.segments_waiting == 3
    ((key, name, help_text, value),) = store.gauges()
    assert (key, name, value) == ("store_segments_waiting", "im_store_log_segments_waiting", 3)
    assert f"appends wait at {sqlite_module._MAX_BEHIND}" in help_text
    holder.execute("COMMIT")
    await store.settle()
    assert store.segments_waiting == 0
    assert _table(path) == [("p:alice:bob", s) for s in (1, 2, 3)]
    holder.close()
    await store.close()


async def test_an_in_memory_store_moves_inline_with_the_same_answers() -> None:
    store = SQLiteStore(":memory:")  # no file for a thread to open: moves run on the loop
    conv = "p:alice:bob"
    await store.append([_msg(conv, s) for s in range(1, 6)])
    assert store._hot and store._mover.inline
    await store.settle()
    assert store._hot == {} and store._moving == deque()
    await store.append([_msg(conv, s) for s in range(6, 11)])
    assert [m.seq for m in await store.fetch(conv, 3, 4)] == [4, 5, 6, 7]  # table + hot
    assert await store.advance("bob", "d1", conv, 7) == 7
    store._flush_moved()  # inline: written at once, nothing left at the mover
    assert store._writing == [] and await store.cursors("bob", "d1") == {conv: 7}
    assert store._db.execute("SELECT seq FROM cursors").fetchall() == [(7,)]
    await store.close()


async def test_cursors_moved_before_any_append_reach_the_file_and_moves_go_on(
        tmp_path: Path) -> None:
    path = str(tmp_path / "first.db")
    store = SQLiteStore(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the first cursor write waits at the mover...
    assert await store.advance("bob", "d1", "p:alice:bob", 3) == 3  # a resume's acks, say
    for _ in range(100):
        await asyncio.sleep(sqlite_module._FLUSH_DELAY / 5)
        if store._writing:
            break
    assert await store.advance("bob", "d1", "p:alice:bob", 4) == 4  # ...while this one moves
    await asyncio.sleep(sqlite_module._FLUSH_DELAY * 1.5)  # its flush found a write at the mover
    assert store._cursor_dirty and store._flush_handle is None
    holder.execute("COMMIT")
    for _ in range(100):  # the answer comes back to the loop, which flushes the second
        await asyncio.sleep(sqlite_module._FLUSH_DELAY / 5)
        if holder.execute("SELECT seq FROM cursors").fetchall() == [(4,)]:
            break
    assert holder.execute("SELECT seq FROM cursors").fetchall() == [(4,)]
    holder.close()
    await store.append([_msg("p:alice:bob", 1)])
    await asyncio.wait_for(store.settle(), 30)  # the mover thread is still alive and moving
    assert _table(path) == [("p:alice:bob", 1)]
    await store.close()


def _convs(n: int) -> list[str]:
    return [f"p:alice:u{i:03d}" for i in range(n)]


async def _store_one_each(store: SQLiteStore, convs: list[str], seq: int) -> None:
    for conv in convs:
        reservation = await store.reserve(conv, f"alice:{conv}:{seq}", "m", 0)
        assert (reservation.seq, reservation.duplicate) == (seq, False)
        await store.append([_msg(conv, seq)._replace(cmid=f"{conv}:{seq}")])


@contextlib.asynccontextmanager
async def _store_keeping_latest(limit: int, path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SQLiteStore]:
    """A store whose latest-seq memory keeps ``limit`` conversations."""
    monkeypatch.setattr(sqlite_module, "_LATEST_CACHE", limit)
    store = SQLiteStore(str(path))
    try:
        yield store
    finally:
        await store.close()


async def test_the_latest_seq_memory_is_bounded_and_forgotten_conversations_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded node used to keep two entries per conversation it ever saw
    (its counter and its latest seq): both maps are bounded together."""
    async with _store_keeping_latest(16, tmp_path / "b.db", monkeypatch) as store:
        convs = _convs(64)
        await _store_one_each(store, convs, 1)
        await _store_one_each(store, convs, 2)
        held = "p:alice:held"
        assert (await store.reserve(held, "alice:held:1", "m", 0)).seq == 1  # not stored
        await store.settle()
        assert len(store._stored_latest) <= 16 and len(store._counters) <= 16
        assert set(store._counters) <= set(store._stored_latest)
        assert store._counters[held] == 1  # what the log cannot say is never forgotten
        reads = _reads(store)
        await _store_one_each(store, convs, 3)  # the forgotten ones go on after 2
        assert reads  # read back from the table
        assert (await store.reserve(held, "alice:held:2", "m", 0)).seq == 2
        assert [await store.latest_seq(c) for c in convs] == [3] * 64


async def test_a_conversation_with_entries_not_yet_in_the_table_is_not_forgotten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table cannot answer for hot entries: forgetting one would hand its seq out again."""
    async with _store_keeping_latest(4, tmp_path / "h.db", monkeypatch) as store:
        convs = _convs(32)
        await _store_one_each(store, convs, 1)
        assert set(store._hot) == set(convs)  # the entry log holds them; the table not yet
        store._forget_latest()
        assert set(store._stored_latest) == set(convs)
        await store.settle()
        assert len(store._stored_latest) <= 4
        await _store_one_each(store, convs, 2)
